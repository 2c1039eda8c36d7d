//! Who is at the other end of the handoff socket. Running as the agent's user is not
//! enough (any root process of the node would do): the peer must also be in the agent's
//! user namespace, and either in the agent's own cgroup (its container) or hold CAP_BPF and
//! CAP_SYS_ADMIN in its effective set, which every agent holds and a hostNetwork container
//! without capabilities does not.
//!
//! The peer is found by the pid `SO_PEERCRED` recorded at connect(). A pid can be reused
//! after its process exits; the kernel floor (6.1) has no `SO_PEERPIDFD` (6.5) to rule that
//! out, so a peer that exits at once and whose pid goes to a privileged process of the
//! agent's user namespace before the check would pass (docs/security.md).

use std::{
    fs,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use nix::{
    errno::Errno,
    sys::socket::{self, UnixCredentials, sockopt},
    unistd::Uid,
};

/// Capability numbers (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const AGENT_CAPABILITIES: u64 = 1 << CAP_SYS_ADMIN | 1 << CAP_BPF;

#[derive(Debug, thiserror::Error)]
pub enum PeerRefusal {
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(Errno),
    #[error("the peer runs as uid {peer}, not as the agent's uid {ours}")]
    ForeignUser { peer: u32, ours: u32 },
    #[error("the peer's process is not visible in the agent's PID namespace")]
    Invisible,
    #[error("the peer (pid {pid}) runs in another user namespace")]
    ForeignUserNamespace { pid: i32 },
    #[error(
        "the peer (pid {pid}) is neither in the agent's cgroup nor holds CAP_BPF and CAP_SYS_ADMIN (effective capabilities {effective:#x})"
    )]
    Unprivileged { pid: i32, effective: u64 },
    #[error("cannot check the peer (pid {pid}): {path}: {reason}")]
    Unreadable {
        pid: i32,
        path: PathBuf,
        reason: String,
    },
}

/// The peer of `connection`, checked as the module says.
pub fn check(connection: &OwnedFd) -> Result<(), PeerRefusal> {
    let credentials = socket::getsockopt(connection, sockopt::PeerCredentials)
        .map_err(PeerRefusal::Credentials)?;
    check_credentials(&credentials)
}

fn check_credentials(credentials: &UnixCredentials) -> Result<(), PeerRefusal> {
    let ours = Uid::effective().as_raw();
    if credentials.uid() != ours {
        return Err(PeerRefusal::ForeignUser {
            peer: credentials.uid(),
            ours,
        });
    }
    // 0: the peer lives in a PID namespace this one does not see into.
    let pid = credentials.pid();
    if pid <= 0 {
        return Err(PeerRefusal::Invisible);
    }
    let peer = Process::Pid(pid);
    if peer.user_namespace()? != Process::Agent.user_namespace()? {
        return Err(PeerRefusal::ForeignUserNamespace { pid });
    }
    if peer.read("cgroup")? == Process::Agent.read("cgroup")? {
        return Ok(());
    }
    let status = peer.read("status")?;
    let effective = effective_capabilities(&status).ok_or_else(|| PeerRefusal::Unreadable {
        pid,
        path: peer.path("status"),
        reason: "no CapEff line".to_owned(),
    })?;
    if effective & AGENT_CAPABILITIES == AGENT_CAPABILITIES {
        Ok(())
    } else {
        Err(PeerRefusal::Unprivileged { pid, effective })
    }
}

/// A process whose `/proc` entries are read: the agent itself or the peer.
#[derive(Clone, Copy)]
enum Process {
    Agent,
    Pid(i32),
}

impl Process {
    fn path(self, entry: &str) -> PathBuf {
        match self {
            Process::Agent => PathBuf::from("/proc/self").join(entry),
            Process::Pid(pid) => PathBuf::from(format!("/proc/{pid}")).join(entry),
        }
    }

    fn unreadable(self, entry: &str, error: &std::io::Error) -> PeerRefusal {
        PeerRefusal::Unreadable {
            pid: match self {
                Process::Agent => std::process::id().try_into().unwrap_or(i32::MAX),
                Process::Pid(pid) => pid,
            },
            path: self.path(entry),
            reason: error.to_string(),
        }
    }

    fn read(self, entry: &str) -> Result<String, PeerRefusal> {
        fs::read_to_string(self.path(entry)).map_err(|error| self.unreadable(entry, &error))
    }

    /// The user namespace's identity: the device and inode of its nsfs file.
    fn user_namespace(self) -> Result<(u64, u64), PeerRefusal> {
        let metadata = fs::metadata(self.path("ns/user"))
            .map_err(|error| self.unreadable("ns/user", &error))?;
        Ok((metadata.dev(), metadata.ino()))
    }
}

/// The `CapEff` bits of a `/proc/<pid>/status`.
fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_are_read_from_the_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000000800020000\n\
                      CapEff:\t0000008000201000\nCapBnd:\t000001ffffffffff\n";
        let effective = effective_capabilities(status).expect("CapEff");
        assert_eq!(effective & AGENT_CAPABILITIES, AGENT_CAPABILITIES);
        let without_bpf = "CapEff:\t0000000000201000\n";
        let effective = effective_capabilities(without_bpf).expect("CapEff");
        assert_ne!(effective & AGENT_CAPABILITIES, AGENT_CAPABILITIES);
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }

    #[test]
    fn the_agent_itself_passes_and_another_user_does_not() {
        let pid = i32::try_from(std::process::id()).expect("pid");
        let ours = Uid::effective().as_raw();
        let ucred = |uid: u32, pid: i32| UnixCredentials::from(libc::ucred { pid, uid, gid: 0 });
        // Same process, so same cgroup and user namespace, whatever its capabilities.
        check_credentials(&ucred(ours, pid)).expect("the agent's own process");
        assert!(matches!(
            check_credentials(&ucred(ours.wrapping_add(1), pid)),
            Err(PeerRefusal::ForeignUser { .. })
        ));
        assert!(matches!(
            check_credentials(&ucred(ours, 0)),
            Err(PeerRefusal::Invisible)
        ));
    }
}
