//! Listener handoff between two agents on one node (restart or DaemonSet surge upgrade).
//!
//! The running agent serves a Unix `SOCK_SEQPACKET` socket at a path in a directory that is
//! the agent's alone (`/run/nodemesh/handoff.sock` by default: a hostPath only the agent's
//! pods mount, kept 0700 by `directory`). A starting agent connects to it and gets a
//! duplicate of every in-pod listening socket (`SCM_RIGHTS`), with the pod, network
//! namespace, role and address of each. The sockets are the *same* kernel objects, so
//! connections queued on them are never lost and the pinned maps that name them
//! (`NM_INBOUND_LISTENERS`) stay valid. When the successor is ready (programs attached,
//! cluster state synced, certificates held) it starts accepting and sends `TakeOver`; the
//! old agent stops accepting, closes its admin listeners, releases the handoff socket,
//! answers with the number of connections it still serves, and drains them (see `drain`).
//!
//! Both ends check the peer (`peer`): the agent's user and user namespace, and the agent's
//! cgroup or CAP_BPF and CAP_SYS_ADMIN. A peer that fails is told why and refused; the agent
//! serves on.
//!
//! Protocol: one JSON message per packet; `Listener` packets carry one descriptor.
//! ```text
//! successor -> agent   Hello { version, dns }      (dns: it takes DNS sockets too)
//! agent -> successor   Listener { name } + fd     (once per listener; role `dns` only
//!                                                  to a successor that said `dns`)
//! agent -> successor   End { listeners }
//! successor -> agent   TakeOver                   (when ready; EOF instead = abandoned)
//! agent -> successor   Draining { connections }
//! agent -> peer        Refused { reason }         (instead, to a peer it refuses)
//! ```

mod directory;
mod peer;

use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

pub use directory::DirectoryError;
use nix::{
    errno::Errno,
    sys::{
        socket::{
            self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
            SockType, UnixAddr, sockopt,
        },
        time::TimeVal,
    },
};
pub use peer::PeerRefusal;
use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

/// Version of the handoff protocol; both agents must speak the same.
const VERSION: u32 = 1;
/// Largest message (JSON) we send or accept.
const MAX_MESSAGE: usize = 16 * 1024;
/// How long one step of the exchange (except waiting for `TakeOver`) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {address}: {action}: {errno}")]
    Socket {
        address: String,
        action: &'static str,
        errno: Errno,
    },
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("handoff socket {address}: another agent serves it")]
    Served { address: String },
    #[error("handoff socket {address}: refused the peer: {refusal}")]
    PeerRefused {
        address: String,
        refusal: PeerRefusal,
    },
    #[error("handoff socket {address}: {reason}")]
    Protocol { address: String, reason: String },
}

/// Where the handoff socket lives: an absolute path whose directory is the agent's alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoffAddress(PathBuf);

impl FromStr for HandoffAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let path = PathBuf::from(s);
        if !path.is_absolute() || path.file_name().is_none() || path.parent().is_none() {
            return Err(format!(
                "handoff socket {s:?}: an absolute path to a socket file is needed, e.g. /run/nodemesh/handoff.sock"
            ));
        }
        if s.len() > MAX_PATH {
            return Err(format!(
                "handoff socket {s:?} is longer than {MAX_PATH} bytes"
            ));
        }
        Ok(Self(path))
    }
}

impl std::fmt::Display for HandoffAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

impl HandoffAddress {
    /// The directory the socket lives in (made safe before the socket is used).
    pub fn directory(&self) -> &Path {
        self.0.parent().unwrap_or(Path::new("/"))
    }

    fn unix_addr(&self) -> Result<UnixAddr, HandoffError> {
        UnixAddr::new(self.0.as_os_str().as_bytes()).map_err(|errno| self.error("naming", errno))
    }

    fn error(&self, action: &'static str, errno: Errno) -> HandoffError {
        HandoffError::Socket {
            address: self.to_string(),
            action,
            errno,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> HandoffError {
        HandoffError::Protocol {
            address: self.to_string(),
            reason: reason.into(),
        }
    }

    fn refused(&self, refusal: PeerRefusal) -> HandoffError {
        HandoffError::PeerRefused {
            address: self.to_string(),
            refusal,
        }
    }

    /// Removes a socket file no agent serves any more (one left by an agent that handed
    /// over or died); fails if an agent still answers on it.
    fn remove_stale(&self) -> Result<(), HandoffError> {
        let probe = seqpacket(self)?;
        match socket::connect(probe.as_raw_fd(), &self.unix_addr()?) {
            Ok(()) => Err(HandoffError::Served {
                address: self.to_string(),
            }),
            Err(Errno::ENOENT) => Ok(()),
            Err(Errno::ECONNREFUSED) => match std::fs::remove_file(&self.0) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(error) => Err(self.error(
                    "removing the stale socket",
                    error
                        .raw_os_error()
                        .map_or(Errno::UnknownErrno, Errno::from_raw),
                )),
            },
            Err(errno) => Err(self.error("probing", errno)),
        }
    }
}

/// What an in-pod listener is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerRole {
    Outbound,
    Hbone,
    Plaintext,
    /// The UDP socket a pod's DNS queries are steered to (a datagram socket, not a
    /// listener, handed over the same way so no query is lost in an upgrade).
    Dns,
}

/// Names one in-pod listener across agents. The network namespace's inode guards against a
/// pod whose sandbox was recreated (same UID, new namespace) in between.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerName {
    pub pod_uid: String,
    pub netns_inode: u64,
    pub role: ListenerRole,
    pub addr: SocketAddr,
}

/// A listening socket handed from one agent to the other.
#[derive(Debug)]
pub struct HandedListener {
    pub name: ListenerName,
    pub fd: OwnedFd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        version: u32,
        /// Whether the successor takes `Dns` sockets. Agents that predate DNS handoff
        /// neither send it (`false`) nor know the role.
        #[serde(default)]
        dns: bool,
    },
    Listener {
        name: ListenerName,
    },
    End {
        listeners: usize,
    },
    Refused {
        reason: String,
    },
    TakeOver,
    Draining {
        connections: usize,
    },
}

/// What the serving side asks of the agent's main loop.
#[derive(Debug)]
pub enum Event {
    /// A successor connected: answer with duplicates of every in-pod listener.
    Hello(oneshot::Sender<Vec<HandedListener>>),
    /// The successor accepts now: stop accepting, answer with the connections left.
    TakeOver(oneshot::Sender<usize>),
    /// The successor went away before taking over: carry on as before.
    Abandoned,
}

/// Binds `address` and serves successors until one takes over or the returned task is
/// aborted (the agent stops); `events` go to the agent's main loop. Fails if the directory
/// is not safe or another agent serves the address. The exchange with a successor runs on
/// a blocking thread.
pub fn serve(
    address: &HandoffAddress,
    events: mpsc::Sender<Event>,
) -> Result<JoinHandle<()>, HandoffError> {
    directory::secure(address.directory())?;
    address.remove_stale()?;
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|errno| address.error("creating", errno))?;
    socket::bind(listener.as_raw_fd(), &address.unix_addr()?)
        .map_err(|errno| address.error("binding", errno))?;
    // The directory already keeps everyone else out; the socket file does too.
    std::fs::set_permissions(&address.0, std::fs::Permissions::from_mode(0o600)).map_err(
        |error| {
            let errno = error
                .raw_os_error()
                .map_or(Errno::UnknownErrno, Errno::from_raw);
            address.error("setting mode 0600", errno)
        },
    )?;
    socket::listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .map_err(|errno| address.error("listening", errno))?;
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped.
    let listener = unsafe { AsyncFd::register(listener) }.map_err(|error| {
        let errno =
            (error.into_parts().1.raw_os_error()).map_or(Errno::UnknownErrno, Errno::from_raw);
        address.error("registering", errno)
    })?;
    let address = address.clone();
    tracing::info!(%address, "handoff socket ready for a successor");
    Ok(tokio::spawn(serve_successors(address, listener, events)))
}

async fn serve_successors(
    address: HandoffAddress,
    listener: AsyncFd<OwnedFd>,
    events: mpsc::Sender<Event>,
) {
    while !events.is_closed() {
        let accepted = match listener.readable().await {
            Ok(mut ready) => ready.try_io(|fd| {
                // Without SOCK_NONBLOCK: the exchange itself is blocking, on its own thread.
                socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                    .map_err(std::io::Error::from)
            }),
            Err(error) => {
                tracing::error!(%address, %error, "handoff socket failed; no successor can take over");
                return;
            }
        };
        let connection = match accepted {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(Ok(fd)) => Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
            Ok(Err(error)) => {
                tracing::warn!(%address, %error, "handoff socket: accept failed");
                continue;
            }
            Err(_would_block) => continue,
        };
        let exchange = {
            let (address, connection, events) =
                (address.clone(), Arc::clone(&connection), events.clone());
            tokio::task::spawn_blocking(move || serve_one(&address, &connection, &events)).await
        };
        match exchange {
            Ok(Ok(Some(connections))) => {
                // Release the name for the successor before telling it we are done.
                drop(listener);
                let message = Message::Draining { connections };
                let told = tokio::task::spawn_blocking(move || {
                    send(&address, &connection, &message, None)
                })
                .await;
                if !matches!(told, Ok(Ok(()))) {
                    tracing::warn!("handoff: could not tell the successor that this agent drains");
                }
                return;
            }
            Ok(Ok(None)) => {}
            Ok(Err(error @ HandoffError::PeerRefused { .. })) => {
                tracing::warn!(%error, "handoff: refused a process that may not take the listeners over; still serving")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "handoff with a successor failed; still serving")
            }
            Err(error) => tracing::error!(%error, "handoff task failed; still serving"),
        }
    }
}

/// One peer: `Some(connections left)` when it took over. A peer that said hello and then
/// did not take over is reported to the main loop as `Abandoned`; one that is refused never
/// reaches it.
fn serve_one(
    address: &HandoffAddress,
    connection: &OwnedFd,
    events: &mpsc::Sender<Event>,
) -> Result<Option<usize>, HandoffError> {
    if let Err(refusal) = peer::check(connection) {
        let reason = refusal.to_string();
        // Best effort: the peer learns why (a successor missing a capability, say).
        let _ = set_timeout(address, connection, Some(STEP_TIMEOUT))
            .and_then(|()| send(address, connection, &Message::Refused { reason }, None));
        return Err(address.refused(refusal));
    }
    set_timeout(address, connection, Some(STEP_TIMEOUT))?;
    let takes_dns = match receive(address, connection)? {
        (
            Message::Hello {
                version: VERSION,
                dns,
            },
            _,
        ) => dns,
        (Message::Hello { version, .. }, _) => {
            let reason =
                format!("successor speaks handoff version {version}, this agent {VERSION}");
            send(
                address,
                connection,
                &Message::Refused {
                    reason: reason.clone(),
                },
                None,
            )?;
            return Err(address.protocol(reason));
        }
        (other, _) => return Err(address.protocol(format!("expected Hello, got {other:?}"))),
    };
    let (reply, listeners) = oneshot::channel();
    events
        .blocking_send(Event::Hello(reply))
        .map_err(|_| address.protocol("the agent is stopping"))?;
    let outcome = hand_over(address, connection, events, listeners, takes_dns);
    if !matches!(outcome, Ok(Some(_))) {
        let _ = events.blocking_send(Event::Abandoned);
    }
    outcome
}

/// After the successor's hello: its listeners, then its `TakeOver` (or its leaving).
fn hand_over(
    address: &HandoffAddress,
    connection: &OwnedFd,
    events: &mpsc::Sender<Event>,
    listeners: oneshot::Receiver<Vec<HandedListener>>,
    takes_dns: bool,
) -> Result<Option<usize>, HandoffError> {
    let mut listeners = listeners
        .blocking_recv()
        .map_err(|_| address.protocol("the agent is stopping"))?;
    if !takes_dns {
        // It binds the DNS port itself once this agent lets go of it.
        listeners.retain(|l| l.name.role != ListenerRole::Dns);
    }
    for listener in &listeners {
        let message = Message::Listener {
            name: listener.name.clone(),
        };
        send(address, connection, &message, Some(listener.fd.as_raw_fd()))?;
    }
    let count = listeners.len();
    drop(listeners);
    send(
        address,
        connection,
        &Message::End { listeners: count },
        None,
    )?;
    tracing::info!(%address, listeners = count, "handed the in-pod listeners to a successor; it accepts when ready");
    // The successor becomes ready when it holds its certificates: no bound here.
    set_timeout(address, connection, None)?;
    match receive(address, connection) {
        Ok((Message::TakeOver, _)) => {}
        Ok((other, _)) => return Err(address.protocol(format!("expected TakeOver, got {other:?}"))),
        Err(error) => {
            tracing::info!(%error, "the successor left before taking over");
            return Ok(None);
        }
    }
    let (reply, left) = oneshot::channel();
    events
        .blocking_send(Event::TakeOver(reply))
        .map_err(|_| address.protocol("the agent is stopping"))?;
    let left = left
        .blocking_recv()
        .map_err(|_| address.protocol("the agent is stopping"))?;
    Ok(Some(left))
}

/// An agent that is still running and has handed us its listeners.
#[derive(Debug)]
pub struct Predecessor {
    address: HandoffAddress,
    connection: OwnedFd,
}

/// Asks the agent serving `address` for its in-pod listeners. `Ok(None)`: no agent serves
/// it (first start, or the previous agent is gone), so there is nothing to take over.
pub fn inherit(
    address: &HandoffAddress,
) -> Result<Option<(Predecessor, Vec<HandedListener>)>, HandoffError> {
    // At a node's first start this creates the directory; later it refuses one made unsafe.
    directory::secure(address.directory())?;
    let connection = seqpacket(address)?;
    match socket::connect(connection.as_raw_fd(), &address.unix_addr()?) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(None),
        Err(errno) => return Err(address.error("connecting", errno)),
    }
    peer::check(&connection).map_err(|refusal| address.refused(refusal))?;
    set_timeout(address, &connection, Some(STEP_TIMEOUT))?;
    if let Err(error) = send(
        address,
        &connection,
        &Message::Hello {
            version: VERSION,
            dns: true,
        },
        None,
    ) {
        // A predecessor that refused us has said why before closing.
        return Err(match receive(address, &connection) {
            Ok((Message::Refused { reason }, _)) => address.protocol(reason),
            _ => error,
        });
    }
    let mut listeners = Vec::new();
    loop {
        match receive(address, &connection)? {
            (Message::Listener { name }, Some(fd)) => listeners.push(HandedListener { name, fd }),
            (Message::Listener { name }, None) => {
                return Err(address.protocol(format!("listener {name:?} came without its socket")));
            }
            (Message::End { listeners: count }, _) if count == listeners.len() => break,
            (Message::End { listeners: count }, _) => {
                return Err(address.protocol(format!(
                    "predecessor announced {count} listeners, sent {}",
                    listeners.len()
                )));
            }
            (Message::Refused { reason }, _) => return Err(address.protocol(reason)),
            (other, _) => return Err(address.protocol(format!("unexpected {other:?}"))),
        }
    }
    let predecessor = Predecessor {
        address: address.clone(),
        connection,
    };
    Ok(Some((predecessor, listeners)))
}

impl Predecessor {
    /// Tells the predecessor that we accept now; returns how many connections it still
    /// serves (it drains them). Once this returns, the handoff address is free.
    pub fn take_over(self) -> Result<usize, HandoffError> {
        let Self {
            address,
            connection,
        } = self;
        send(&address, &connection, &Message::TakeOver, None)?;
        match receive(&address, &connection)? {
            (Message::Draining { connections }, _) => Ok(connections),
            (other, _) => Err(address.protocol(format!("expected Draining, got {other:?}"))),
        }
    }
}

fn seqpacket(address: &HandoffAddress) -> Result<OwnedFd, HandoffError> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| address.error("creating", errno))
}

fn set_timeout(
    address: &HandoffAddress,
    connection: &OwnedFd,
    timeout: Option<Duration>,
) -> Result<(), HandoffError> {
    let value = timeout.map_or(TimeVal::new(0, 0), |t| {
        TimeVal::new(
            i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            i64::from(t.subsec_micros()),
        )
    });
    socket::setsockopt(connection, sockopt::ReceiveTimeout, &value)
        .map_err(|errno| address.error("setting the receive timeout", errno))
}

fn send(
    address: &HandoffAddress,
    connection: &OwnedFd,
    message: &Message,
    fd: Option<RawFd>,
) -> Result<(), HandoffError> {
    let bytes = serde_json::to_vec(message)
        .map_err(|error| address.protocol(format!("encoding {message:?}: {error}")))?;
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<UnixAddr>(
            connection.as_fd().as_raw_fd(),
            &[IoSlice::new(&bytes)],
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(address.error("sending", errno)),
        }
    }
}

fn receive(
    address: &HandoffAddress,
    connection: &OwnedFd,
) -> Result<(Message, Option<OwnedFd>), HandoffError> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let mut control = nix::cmsg_space!([RawFd; 4]);
    // A peer that closed with our message unread is reported as a reset before the messages
    // it sent (a refusal and its reason): those are read after it.
    let mut reset_seen = false;
    let (length, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buffer)];
        match socket::recvmsg::<UnixAddr>(
            connection.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(received) => {
                let mut fds = Vec::new();
                for message in received
                    .cmsgs()
                    .map_err(|errno| address.error("receiving", errno))?
                {
                    if let ControlMessageOwned::ScmRights(rights) = message {
                        // SAFETY: SCM_RIGHTS installed these descriptors for us alone.
                        fds.extend(
                            rights
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                let truncated = received
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (received.bytes, fds, truncated);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) if !reset_seen => reset_seen = true,
            Err(Errno::EAGAIN) => {
                return Err(address.protocol(format!("no answer within {STEP_TIMEOUT:?}")));
            }
            Err(errno) => return Err(address.error("receiving", errno)),
        }
    };
    if length == 0 {
        return Err(address.protocol("the peer closed the connection"));
    }
    if truncated {
        return Err(address.protocol("message or descriptors truncated"));
    }
    let message: Message = serde_json::from_slice(&buffer[..length])
        .map_err(|error| address.protocol(format!("malformed message: {error}")))?;
    let mut fds = fds.into_iter();
    let fd = fds.next();
    if fds.next().is_some() {
        return Err(address.protocol("more than one descriptor in a message"));
    }
    Ok((message, fd))
}

#[cfg(test)]
mod tests;
