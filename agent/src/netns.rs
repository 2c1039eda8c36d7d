//! A pod's network namespace, and creating the proxy's sockets inside it. It stands below
//! both `pods` (enrolment opens a pod's namespace) and `proxy` (which dials from it).
//!
//! A socket stays in the namespace it was created in, and setns() changes only the calling
//! thread. So the thread that needs a socket enters the pod's namespace for the one
//! `socket()` call and returns to the agent's namespace at once; bind, connect and I/O then
//! happen anywhere. This avoids a hop to a per-pod thread on every proxied connection.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// SO_NETNS_COOKIE (linux/asm-generic/socket.h), available since Linux 5.14.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("the pod shares the agent's network namespace (hostNetwork?); refusing to capture it")]
    HostNetwork,
    #[error("entering the pod's network namespace: {0}")]
    Enter(nix::Error),
    #[error("reading the network namespace cookie: {0}")]
    Cookie(io::Error),
    #[error("creating a socket in the pod's network namespace: {0}")]
    Socket(io::Error),
    #[error("listing the addresses of the pod's network namespace: {0}")]
    Addresses(io::Error),
}

/// The agent's own network namespace, to return to after creating a pod's socket.
fn agent_netns() -> Result<&'static Arc<File>, NetnsError> {
    static AGENT_NETNS: OnceLock<Arc<File>> = OnceLock::new();
    if let Some(netns) = AGENT_NETNS.get() {
        return Ok(netns);
    }
    let path = PathBuf::from("/proc/thread-self/ns/net");
    let file = File::open(&path).map_err(|source| NetnsError::Open { path, source })?;
    Ok(AGENT_NETNS.get_or_init(|| Arc::new(file)))
}

/// Creates TCP sockets inside one pod's network namespace.
pub struct NetnsSockets {
    netns: File,
    home: Arc<File>,
    cookie: u64,
    inode: u64,
}

impl NetnsSockets {
    /// Opens the network namespace of `pid`.
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
        let home = Arc::clone(agent_netns()?);
        let home_inode = home.metadata().map(|m| m.ino()).unwrap_or(0);
        if inode == home_inode {
            return Err(NetnsError::HostNetwork);
        }
        let mut sockets = Self {
            netns,
            home,
            cookie: 0,
            inode,
        };
        let probe = sockets.tcp_socket(Domain::IPV4)?;
        sockets.cookie = netns_cookie(&probe).map_err(NetnsError::Cookie)?;
        Ok(sockets)
    }

    /// The namespace itself (for attaching programs to it).
    pub fn netns(&self) -> &File {
        &self.netns
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
    pub fn tcp_socket(&self, domain: Domain) -> Result<Socket, NetnsError> {
        self.run_inside(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))?
            .map_err(NetnsError::Socket)
    }

    /// The non-loopback addresses of the namespace's interfaces.
    pub fn local_addresses(&self) -> Result<Vec<IpAddr>, NetnsError> {
        let addrs = self
            .run_inside(nix::ifaddrs::getifaddrs)?
            .map_err(|error| NetnsError::Addresses(error.into()))?;
        let mut found = non_loopback(addrs);
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Runs `f` on this thread while it is inside the pod's network namespace, then returns
    /// to the agent's. `f` must be short and must not await: it holds the thread.
    pub fn run_inside<R>(&self, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        setns(self.netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
        let result = f();
        if let Err(error) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // This thread would create every later socket in the pod: never continue.
            tracing::error!(%error, "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
        Ok(result)
    }
}

/// The non-loopback IP addresses among `addrs` (of the node's namespace, or of a pod's).
pub fn non_loopback(addrs: nix::ifaddrs::InterfaceAddressIterator) -> Vec<IpAddr> {
    addrs
        .filter_map(|ifaddr| ifaddr.address)
        .filter_map(|addr| {
            addr.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect()
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

/// Which families the pod can deliver with the client's source address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourcePreservation {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl SourcePreservation {
    pub fn covers(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(_) => self.ipv4,
            IpAddr::V6(_) => self.ipv6,
        }
    }
}
