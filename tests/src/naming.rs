//! Names of testbeds and of every global object derived from them.
//!
//! A testbed is `<prefix><owner pid>x<counter>`; its objects are `<name>-...` network
//! namespaces, `<cgroup2 root>/<name>`, `/sys/fs/bpf/<name>` and `<tmp>/<name>-...`
//! directories (cluster state, control plane, container runtime, the nodes' `/run/nodemesh`),
//! so leftovers of a dead owner can be found and removed by name alone.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{cgroup::cgroup2_root, error::Result};

/// Where bpffs is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh testbed name for this process.
pub(crate) fn new_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// If `entry` (a netns, directory or file name) belongs to a testbed with this prefix,
/// returns that testbed's name and owner pid.
pub(crate) fn parse_owner(prefix: &str, entry: &str) -> Option<(String, u32)> {
    let rest = entry.strip_prefix(prefix)?;
    let (pid, after) = rest.split_once('x')?;
    let counter_len = after.bytes().take_while(u8::is_ascii_digit).count();
    let tail = &after[counter_len..];
    let valid = !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && counter_len > 0
        && (tail.is_empty() || tail.starts_with('-'));
    if !valid {
        return None;
    }
    let name = format!("{prefix}{pid}x{}", &after[..counter_len]);
    Some((name, pid.parse().ok()?))
}

/// The prefix every network namespace of a testbed starts with.
pub(crate) fn netns_prefix(name: &str) -> String {
    format!("{name}-")
}

/// The testbed's cgroup directory.
pub(crate) fn cgroup_dir(name: &str) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join(name))
}

/// The testbed's bpffs directory (one subdirectory per node).
pub(crate) fn bpffs_dir(name: &str) -> PathBuf {
    PathBuf::from(BPFFS_ROOT).join(name)
}

/// The testbed's control plane directory: certificates, tokens, kubeconfigs, etcd's data.
pub(crate) fn control_plane_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-control-plane"))
}

/// The testbed's container runtime directory: containerd's root, state and socket, runc's
/// state, container specs and the images' root filesystems mounted for containers.
pub(crate) fn container_runtime_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-containerd"))
}

/// The testbed's counterpart of the nodes' `/run/nodemesh` (one subdirectory per node).
pub(crate) fn run_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-run"))
}

/// The testbed's cluster-state directory.
pub(crate) fn cluster_state_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-cluster-state"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owners() {
        assert_eq!(
            parse_owner("nmt", "nmt123x4-node1"),
            Some(("nmt123x4".into(), 123))
        );
        assert_eq!(
            parse_owner("nmt", "nmt123x4"),
            Some(("nmt123x4".into(), 123))
        );
        assert_eq!(
            parse_owner("nmt", "nmt123x4-cluster-state"),
            Some(("nmt123x4".into(), 123))
        );
        assert_eq!(parse_owner("nm", "nmt123x4"), None);
        assert_eq!(parse_owner("nmt", "nmt123x"), None);
        assert_eq!(parse_owner("nmt", "nmt12ax4"), None);
        assert_eq!(parse_owner("nmt", "nmt123x4y"), None);
    }
}
