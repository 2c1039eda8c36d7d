//! The proxy's listening sockets in one pod while it is being enrolled.

use std::{net::SocketAddr, os::fd::OwnedFd};

use tokio::net::TcpListener;

use crate::lifecycle::handoff::{ListenerName, ListenerRole};

/// Connections waiting in a listening socket's accept queue (TCP_INFO's `tcpi_unacked` is
/// the accept backlog for a listener); 0 when it cannot be read.
pub(super) fn accept_queue_length(listener: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid descriptor and a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 { info.tcpi_unacked } else { 0 }
}

/// The listeners of one pod being enrolled, for handing them over later.
pub(super) struct Opened {
    pub(super) pod_uid: String,
    pub(super) netns_inode: u64,
    pub(super) duplicates: Vec<(ListenerName, OwnedFd)>,
}

impl Opened {
    pub(super) fn new(pod_uid: &str, netns_inode: u64) -> Self {
        Self {
            pod_uid: pod_uid.to_owned(),
            netns_inode,
            duplicates: Vec::new(),
        }
    }

    /// The name of this pod's socket for `role` at `addr`, for a successor.
    pub(super) fn name(&self, role: ListenerRole, addr: SocketAddr) -> ListenerName {
        ListenerName {
            pod_uid: self.pod_uid.clone(),
            netns_inode: self.netns_inode,
            role,
            addr,
        }
    }
}

/// One listening socket of a pod, and whether the previous agent handed it over.
pub(super) struct PodListener {
    pub(super) addr: SocketAddr,
    pub(super) listener: TcpListener,
    pub(super) adopted: bool,
}
