//! The kernel side of capture as the agent sees it: load the eBPF object, attach its
//! programs to the node's pod cgroup root, pin everything, and keep the maps in sync.

mod attach;
mod maps;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{Ebpf, EbpfLoader};
use nodemesh_common::{ConnectionKey, InboundPod, OriginalDst};

pub use self::maps::{MapOccupancy, address_words, inbound_key};
use crate::config::AgentConfig;

/// The compiled programs, built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodemesh-ebpf"));

/// bpffs magic number (statfs f_type), see linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The oldest kernel the datapath is proven on (`cargo xtask vm-test`, docs/vm-test.md), and
/// the newest feature it needs below that.
const KERNEL_FLOOR: (u32, u32) = (6, 1);
const NEWEST_FEATURES: &str = "sk_lookup with sockhash assignment (5.9) and its 16-bit \
    remote_port (5.19), SO_NETNS_COOKIE (5.14), bpf links for cgroup programs (5.7), \
    getpeername hooks (5.8)";

/// Says at start-up when the kernel is older than the documented floor, and what it needs;
/// loading then fails on the first missing feature with the kernel's own error.
fn check_kernel_floor() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(version) if version < KERNEL_FLOOR => tracing::error!(
            kernel = release.trim(),
            floor = %format!("{}.{}", KERNEL_FLOOR.0, KERNEL_FLOOR.1),
            needs = NEWEST_FEATURES,
            "this kernel is older than nodemesh's floor; loading the datapath will likely fail"
        ),
        Some(_) => {}
        None => tracing::warn!(kernel = release.trim(), "cannot read the kernel version"),
    }
}

/// `(major, minor)` of a kernel release such as `6.1.0-57-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{0} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` \
         and point --bpffs below it"
    )]
    NotBpffs(PathBuf),
    #[error("creating pin directory {path}: {source}")]
    PinDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object (is this kernel >= 6.1 with BTF, and are we root?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("opening cgroup {path} to attach programs: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning link of {name} at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// The loaded, attached and pinned datapath of one agent.
pub struct Datapath {
    maps: Mutex<maps::DatapathMaps>,
    attach_point: PathBuf,
    /// Pinned per-pod links of the inbound program, one file per pod UID.
    inbound_link_dir: PathBuf,
    // Keeps the programs loaded for as long as the agent runs (the pinned links outlive it),
    // and attaches the inbound program to each enrolled pod.
    ebpf: Mutex<Ebpf>,
}

impl Datapath {
    /// Loads the programs, reuses or creates the pinned maps, writes the capture settings and
    /// attaches to `attach_point` (the node's pod cgroup root).
    pub fn load(config: &AgentConfig, attach_point: &Path) -> Result<Self, DatapathError> {
        check_kernel_floor();
        ensure_bpffs(&config.bpffs)?;
        let map_dir = config.bpffs.join("maps");
        let link_dir = config.bpffs.join("links");
        let inbound_link_dir = link_dir.join("inbound");
        for dir in [&map_dir, &link_dir, &inbound_link_dir] {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDirectory {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load(EBPF_OBJECT)?;
        let mut maps = maps::DatapathMaps::take(&mut ebpf)?;
        maps.write_exclusions(&config.exclude_ports, &config.exclude_cidrs)?;
        maps.write_capture_config(config.outbound_port, config.fail_mode, config.proxy_mark)?;
        attach::attach_all(&mut ebpf, attach_point, &link_dir)?;
        attach::load_inbound(&mut ebpf)?;
        Ok(Self {
            maps: Mutex::new(maps),
            attach_point: attach_point.to_owned(),
            inbound_link_dir,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// The cgroup the programs are attached to.
    pub fn attach_point(&self) -> &Path {
        &self.attach_point
    }

    /// Starts capturing connects made by processes in this cgroup or below it.
    pub fn enroll_cgroup(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.lock().enroll(cgroup_id)
    }

    /// Stops capturing for this cgroup.
    pub fn unenroll_cgroup(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.lock().unenroll(cgroup_id)
    }

    /// Cgroup ids currently in the enrolment map (including ones a previous agent left).
    pub fn enrolled_cgroups(&self) -> Result<Vec<u64>, DatapathError> {
        self.lock().enrolled_cgroups()
    }

    /// Starts handing plaintext that arrives at the pod `uid` (network namespace `netns`,
    /// addresses `listeners`' keys) to the proxy's plaintext listeners in it.
    pub fn capture_inbound(
        &self,
        uid: &str,
        netns: &File,
        pod: InboundPod,
        listeners: &[(IpAddr, BorrowedFd<'_>)],
    ) -> Result<(), DatapathError> {
        {
            let mut maps = self.lock();
            for (addr, listener) in listeners {
                maps.set_inbound(*addr, pod, *listener)?;
            }
        }
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        attach::attach_inbound(&mut ebpf, netns, &self.inbound_link_dir.join(uid))
    }

    /// Changes how the kernel treats plaintext for these addresses when no listener is there.
    pub fn set_inbound_mode(&self, addrs: &[IpAddr], pod: InboundPod) -> Result<(), DatapathError> {
        let mut maps = self.lock();
        for addr in addrs {
            maps.set_inbound_pod(*addr, pod)?;
        }
        Ok(())
    }

    /// Marks `source` as the proxy's own connection to an application, so the inbound program
    /// does not capture it; [`Datapath::end_delivery`] once it is established.
    pub fn begin_delivery(&self, source: SocketAddr) -> Result<(), DatapathError> {
        self.lock().add_delivery(source)
    }

    pub fn end_delivery(&self, source: SocketAddr) {
        self.lock().remove_delivery(source)
    }

    /// Stops inbound capture for the pod `uid` with these addresses.
    pub fn release_inbound(&self, uid: &str, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let link = self.inbound_link_dir.join(uid);
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DatapathError::Remove { path: link, source }),
        }
        let mut maps = self.lock();
        for addr in addrs {
            maps.remove_inbound(&inbound_key(*addr))?;
        }
        Ok(())
    }

    /// Removes inbound links and map entries whose pod is not in `keep` (UIDs and addresses
    /// of the enrolled pods): what a previous agent left for pods that have gone since.
    pub fn remove_stale_inbound(
        &self,
        keep_uids: &[&str],
        keep_addrs: &[IpAddr],
    ) -> Result<(), DatapathError> {
        let entries =
            std::fs::read_dir(&self.inbound_link_dir).map_err(|source| DatapathError::Remove {
                path: self.inbound_link_dir.clone(),
                source,
            })?;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if !keep_uids.iter().any(|uid| name.to_str() == Some(uid)) {
                let path = entry.path();
                std::fs::remove_file(&path)
                    .map_err(|source| DatapathError::Remove { path, source })?;
                tracing::info!(link = ?name, "removed stale inbound capture link");
            }
        }
        let keep: Vec<_> = keep_addrs.iter().map(|a| inbound_key(*a)).collect();
        let mut maps = self.lock();
        for key in maps.inbound_keys() {
            if !keep.contains(&key) {
                maps.remove_inbound(&key)?;
            }
        }
        Ok(())
    }

    /// Where the connection whose client end is `key` was going; removes the entry.
    pub fn take_original_destination(&self, key: &ConnectionKey) -> Option<OriginalDst> {
        self.lock().take_original_destination(key)
    }

    /// Entry counts of the maps, for the config dump.
    pub fn occupancy(&self) -> MapOccupancy {
        self.lock().occupancy()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, maps::DatapathMaps> {
        // A panic while holding the lock cannot leave the maps half-written (each call is one
        // syscall), so a poisoned lock is still usable.
        self.maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Detaches everything an agent pinned under `bpffs` and deletes its maps.
pub fn remove_pinned(bpffs: &Path) -> Result<(), DatapathError> {
    if !bpffs.exists() {
        tracing::info!(path = %bpffs.display(), "nothing pinned");
        return Ok(());
    }
    ensure_bpffs(bpffs)?;
    // Unpinning a link drops its last reference, which detaches the program.
    std::fs::remove_dir_all(bpffs).map_err(|source| DatapathError::Remove {
        path: bpffs.to_owned(),
        source,
    })?;
    tracing::info!(path = %bpffs.display(), "datapath removed");
    Ok(())
}

fn ensure_bpffs(path: &Path) -> Result<(), DatapathError> {
    // The directory may not exist yet: check the closest existing ancestor.
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statfs::statfs(existing) {
        Ok(fs) if fs.filesystem_type().0 == BPF_FS_MAGIC => Ok(()),
        _ => Err(DatapathError::NotBpffs(path.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_read_as_major_and_minor() {
        assert_eq!(kernel_version("6.1.0-57-amd64\n"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.19.0").is_some_and(|v| v < KERNEL_FLOOR));
        assert!(kernel_version("6.18.44-fc").is_some_and(|v| v >= KERNEL_FLOOR));
    }
}
