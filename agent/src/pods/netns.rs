//! A pod's network namespace, and a worker thread living in it that creates sockets there.
//!
//! setns() changes only the calling thread, and a socket stays in the namespace it was
//! created in, so one long-lived thread per pod creates the proxy's sockets for that pod and
//! everything else (bind, connect, I/O) happens on the tokio runtime.

use std::{
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
    sync::mpsc,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

/// SO_NETNS_COOKIE (linux/asm-generic/socket.h), available since Linux 5.14.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("the pod shares the agent's network namespace (hostNetwork?); refusing to capture it")]
    HostNetwork,
    #[error("entering network namespace of pid {pid}: {source}")]
    Enter { pid: u32, source: nix::Error },
    #[error("reading the network namespace cookie: {0}")]
    Cookie(io::Error),
    #[error("creating a socket in the pod's network namespace: {0}")]
    Socket(io::Error),
    #[error("the socket worker of this pod's network namespace has stopped")]
    WorkerGone,
}

type SocketRequest = (Domain, oneshot::Sender<io::Result<Socket>>);

/// Creates TCP sockets inside one pod's network namespace.
pub struct NetnsSockets {
    requests: mpsc::Sender<SocketRequest>,
    cookie: u64,
    inode: u64,
}

impl NetnsSockets {
    /// Enters the network namespace of `pid` on a dedicated thread.
    pub fn for_process(pid: u32) -> Result<Self, NetnsError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let netns = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let inode = netns
            .metadata()
            .map_err(|source| NetnsError::Open { path, source })?
            .ino();
        if inode == own_netns_inode() {
            return Err(NetnsError::HostNetwork);
        }
        let (requests, incoming) = mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("netns-{pid}"))
            .spawn(move || {
                if let Err(error) = setns(netns.as_fd(), CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(NetnsError::Enter { pid, source: error }));
                    return;
                }
                let cookie = Socket::new(Domain::IPV4, Type::STREAM, None)
                    .and_then(|probe| netns_cookie(&probe))
                    .map_err(NetnsError::Cookie);
                let _ = ready_tx.send(cookie);
                for (domain, reply) in incoming {
                    let _ = reply.send(Socket::new(
                        domain,
                        Type::STREAM.nonblocking(),
                        Some(Protocol::TCP),
                    ));
                }
            })
            .map_err(|source| NetnsError::Open {
                path: PathBuf::from("thread"),
                source,
            })?;
        let cookie = ready_rx.recv().map_err(|_| NetnsError::WorkerGone)??;
        Ok(Self {
            requests,
            cookie,
            inode,
        })
    }

    /// The kernel's cookie for this network namespace (what bpf_get_netns_cookie returns).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace's inode number, as `ls -L -i /proc/<pid>/ns/net` shows it.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A new non-blocking TCP socket in the pod's network namespace.
    pub async fn tcp_socket(&self, domain: Domain) -> Result<Socket, NetnsError> {
        let (reply, response) = oneshot::channel();
        self.requests
            .send((domain, reply))
            .map_err(|_| NetnsError::WorkerGone)?;
        response
            .await
            .map_err(|_| NetnsError::WorkerGone)?
            .map_err(NetnsError::Socket)
    }
}

fn own_netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// The network namespace cookie of the namespace `socket` lives in.
pub fn netns_cookie(socket: &Socket) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
