//! Listener handoff between two agents on one node (restart or DaemonSet surge upgrade).
//!
//! The running agent serves a Unix `SOCK_SEQPACKET` socket (by default the abstract name
//! `@nodemesh/handoff`, which lives in the node's network namespace, shared by the old and
//! the new agent pod: both run with hostNetwork). A starting agent connects to it and gets
//! a duplicate of every in-pod listening socket (`SCM_RIGHTS`), with the pod, network
//! namespace, role and address of each. The sockets are the *same* kernel objects, so
//! connections queued on them are never lost and the pinned maps that name them
//! (`NM_INBOUND_LISTENERS`) stay valid. When the successor is ready (programs attached,
//! cluster state synced, certificates held) it starts accepting and sends `TakeOver`; the
//! old agent stops accepting, releases the handoff name, answers with the number of
//! connections it still serves, and drains them (see `drain`).
//!
//! Both ends check that the peer runs as the same user (`SO_PEERCRED`): only the agent
//! itself may take the pods' listeners.
//!
//! Protocol: one JSON message per packet; `Listener` packets carry one descriptor.
//! ```text
//! successor -> agent   Hello { version }
//! agent -> successor   Listener { name } + fd     (once per listener)
//! agent -> successor   End { listeners }
//! successor -> agent   TakeOver                   (when ready; EOF instead = abandoned)
//! agent -> successor   Draining { connections }
//! ```

use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
            SockType, UnixAddr, sockopt,
        },
        time::TimeVal,
    },
    unistd::Uid,
};
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

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {address}: {action}: {errno}")]
    Socket {
        address: String,
        action: &'static str,
        errno: Errno,
    },
    #[error("handoff socket {address}: peer runs as uid {peer}, not {ours}; refusing it")]
    ForeignPeer {
        address: String,
        peer: u32,
        ours: u32,
    },
    #[error("handoff socket {address}: {reason}")]
    Protocol { address: String, reason: String },
}

/// Where the handoff socket lives: `@name` (abstract, per network namespace) or a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoffAddress(String);

impl FromStr for HandoffAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.strip_prefix('@').unwrap_or(s);
        if name.is_empty() {
            return Err("empty handoff socket name".to_owned());
        }
        // sun_path holds 108 bytes; the abstract form needs one for its leading NUL.
        if s.len() > 107 {
            return Err(format!(
                "handoff socket name {s:?} is longer than 107 bytes"
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Display for HandoffAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl HandoffAddress {
    fn unix_addr(&self) -> Result<UnixAddr, HandoffError> {
        let result = match self.0.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes()),
            None => UnixAddr::new(self.0.as_str()),
        };
        result.map_err(|errno| self.error("naming", errno))
    }

    fn error(&self, action: &'static str, errno: Errno) -> HandoffError {
        HandoffError::Socket {
            address: self.0.clone(),
            action,
            errno,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> HandoffError {
        HandoffError::Protocol {
            address: self.0.clone(),
            reason: reason.into(),
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
    Hello { version: u32 },
    Listener { name: ListenerName },
    End { listeners: usize },
    Refused { reason: String },
    TakeOver,
    Draining { connections: usize },
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
/// aborted (the agent stops); `events` go to the agent's main loop. Fails if another agent
/// holds the address. The exchange with a successor runs on a blocking thread.
pub fn serve(
    address: &HandoffAddress,
    events: mpsc::Sender<Event>,
) -> Result<JoinHandle<()>, HandoffError> {
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|errno| address.error("creating", errno))?;
    let addr = address.unix_addr()?;
    if addr.path().is_some() {
        // A path left by an agent that has handed over (or died): ours now.
        let _ = std::fs::remove_file(address.to_string());
    }
    socket::bind(listener.as_raw_fd(), &addr).map_err(|errno| address.error("binding", errno))?;
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
    loop {
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
            Ok(Err(error)) => {
                tracing::warn!(%error, "handoff with a successor failed; still serving")
            }
            Err(error) => tracing::error!(%error, "handoff task failed; still serving"),
        }
        if events.send(Event::Abandoned).await.is_err() {
            return;
        }
    }
}

/// One successor: `Some(connections left)` when it took over.
fn serve_one(
    address: &HandoffAddress,
    connection: &OwnedFd,
    events: &mpsc::Sender<Event>,
) -> Result<Option<usize>, HandoffError> {
    check_peer(address, connection)?;
    set_timeout(address, connection, Some(STEP_TIMEOUT))?;
    match receive(address, connection)? {
        (Message::Hello { version: VERSION }, _) => {}
        (Message::Hello { version }, _) => {
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
    }
    let (reply, listeners) = oneshot::channel();
    events
        .blocking_send(Event::Hello(reply))
        .map_err(|_| address.protocol("the agent is stopping"))?;
    let listeners = listeners
        .blocking_recv()
        .map_err(|_| address.protocol("the agent is stopping"))?;
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
    let connection = seqpacket(address)?;
    match socket::connect(connection.as_raw_fd(), &address.unix_addr()?) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(None),
        Err(errno) => return Err(address.error("connecting", errno)),
    }
    check_peer(address, &connection)?;
    set_timeout(address, &connection, Some(STEP_TIMEOUT))?;
    send(
        address,
        &connection,
        &Message::Hello { version: VERSION },
        None,
    )?;
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

fn check_peer(address: &HandoffAddress, connection: &OwnedFd) -> Result<(), HandoffError> {
    let credentials = socket::getsockopt(connection, sockopt::PeerCredentials)
        .map_err(|errno| address.error("reading the peer's credentials", errno))?;
    let ours = Uid::effective().as_raw();
    if credentials.uid() != ours {
        return Err(HandoffError::ForeignPeer {
            address: address.to_string(),
            peer: credentials.uid(),
            ours,
        });
    }
    Ok(())
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
