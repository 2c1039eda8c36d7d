//! The kernel side of capture as the agent sees it: load the eBPF object, attach its
//! programs to the node's pod cgroup root, pin everything, and keep the maps in sync.

mod attach;
mod detach;
mod maps;
mod reconcile;

use std::{
    collections::BTreeSet,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
    programs::links::{FdLink, PinnedLink},
};
use nodemesh_common::{ConnectionKey, InboundPod, OriginalDst, map_names};

pub use self::{
    maps::{MapOccupancy, address_words, inbound_key, key_address, socket_addr},
    reconcile::Expected,
};
use crate::config::AgentConfig;

/// The compiled programs, built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodemesh-ebpf"));

/// The oldest kernel the datapath is proven on (`cargo xtask vm-test`, docs/vm-test.md), and
/// the newest feature it needs below that.
pub const KERNEL_FLOOR: (u32, u32) = (6, 1);
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
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The kernel release and what the datapath found in it: the eBPF hooks it attaches (it runs
/// only if every one loaded) and the optional features, probed.
pub fn kernel_features() -> (String, Vec<String>) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut features: Vec<String> = [
        "cgroup/connect4",
        "cgroup/connect6",
        "sock_ops",
        "cgroup/getpeername4",
        "cgroup/getpeername6",
        "sk_lookup",
    ]
    .map(str::to_owned)
    .into();
    if peer_pidfd_supported() {
        features.push("SO_PEERPIDFD".to_owned());
    }
    (release, features)
}

/// Whether the kernel answers `SO_PEERPIDFD` (6.5), tried on a socket pair of our own.
fn peer_pidfd_supported() -> bool {
    use std::os::fd::AsRawFd;
    let Ok((one, _other)) = std::os::unix::net::UnixStream::pair() else {
        return false;
    };
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, into a local int of the length we pass.
    let answered = unsafe {
        libc::getsockopt(
            one.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &mut len,
        )
    } == 0;
    if pidfd >= 0 {
        // SAFETY: the kernel gave us this descriptor; nothing else owns it.
        unsafe { libc::close(pidfd) };
    }
    answered
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{0} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` \
         and point --bpffs below it"
    )]
    NotBpffs(PathBuf),
    #[error("creating pin directory {path}: {source} (is --bpffs on a writable bpffs mount?)")]
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
    #[error(
        "eBPF program {name}: {source} (the agent needs CAP_BPF and CAP_NET_ADMIN and a \
         kernel >= 6.1 with BTF)"
    )]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "opening cgroup {path} to attach programs: {source} (is --cgroup-root the node's \
         cgroup v2 root?)"
    )]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning link of {name} at {path}: {source} (is --bpffs on a writable bpffs mount?)")]
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
    #[error(
        "{count} unpinned bpf link(s) still attached after {waited:?}: the programs stay in force"
    )]
    StillAttached { count: usize, waited: Duration },
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
    map_dir: PathBuf,
    link_dir: PathBuf,
    /// This agent's pinned cgroup links; others are retired once it is in charge.
    own_links: Vec<PathBuf>,
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
        let mut ebpf = load_reusing_pinned_maps(&map_dir)?;
        let mut maps = maps::DatapathMaps::take(&mut ebpf)?;
        maps.write_exclusions(&config.exclude_ports, &config.exclude_cidrs)?;
        maps.write_capture_config(
            config.outbound_port,
            config.dns.as_ref().map_or(0, |dns| dns.port),
            config.fail_mode,
            config.proxy_mark,
        )?;
        let own_links =
            attach::attach_all(&mut ebpf, attach_point, &link_dir, config.dns.is_some())?;
        attach::load_inbound(&mut ebpf)?;
        Ok(Self {
            maps: Mutex::new(maps),
            attach_point: attach_point.to_owned(),
            map_dir,
            link_dir,
            own_links,
            inbound_link_dir,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Makes the maps and the inbound links hold exactly `expected`, repairing (and logging)
    /// every difference; returns how many there were. Never fails: an entry that cannot be
    /// repaired is logged and left for the next pass.
    pub fn reconcile(&self, expected: &Expected<'_>) -> usize {
        let mut repairs = self.lock().reconcile(expected);
        repairs +=
            reconcile::remove_stale_inbound_links(&self.inbound_link_dir, &expected.inbound_links);
        for (uid, netns) in &expected.inbound_links {
            let Some(netns) = netns else { continue };
            if self.inbound_link_dir.join(uid).exists() {
                continue;
            }
            match self.attach_inbound_link(uid, netns) {
                Ok(()) => {
                    repairs += 1;
                    tracing::info!(pod_uid = %uid, "restored a missing inbound capture link");
                }
                Err(error) => {
                    tracing::error!(pod_uid = %uid, %error, "restoring an inbound capture link")
                }
            }
        }
        repairs
    }

    /// Once this agent is in charge with its maps filled: unpins every link but its own (the
    /// previous agent's, other versions') and every map this version does not use (another
    /// layout's, or nobody's). Programs still attached until then kept capture going.
    pub fn retire_other_versions(&self) -> usize {
        attach::retire_other_links(&self.link_dir, &self.own_links)
            + unpin_others(
                &self.map_dir,
                |name| map_names::ALL.contains(&name),
                "unpinned a map of another layout version (or not ours)",
            )
    }

    /// Clears what a previous agent left of transparent deliveries in progress (only safe
    /// when no other agent runs).
    pub fn clear_deliveries(&self) -> usize {
        self.lock().clear_deliveries()
    }

    /// The cgroup the programs are attached to.
    pub fn attach_point(&self) -> &Path {
        &self.attach_point
    }

    /// Starts capturing connects made by processes in this cgroup or below it.
    pub fn enrol_cgroup(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.lock().enrol(cgroup_id)
    }

    /// Stops capturing for this cgroup.
    pub fn unenrol_cgroup(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.lock().unenrol(cgroup_id)
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
        self.attach_inbound_link(uid, netns)
    }

    /// Attaches the inbound program to the network namespace of the pod `uid`, replacing the
    /// link pinned for it before (atomically: capture has no gap).
    pub fn attach_inbound_link(&self, uid: &str, netns: &File) -> Result<(), DatapathError> {
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
        remove_pin(&self.inbound_link_dir.join(uid))?;
        let mut maps = self.lock();
        for addr in addrs {
            maps.remove_inbound(&inbound_key(*addr))?;
        }
        Ok(())
    }

    /// Where the connection whose client end is `key` was going; removes the entry.
    pub fn take_original_destination(&self, key: &ConnectionKey) -> Option<OriginalDst> {
        self.lock().take_original_destination(key)
    }

    /// Captures the UDP DNS of exactly the pods in these network namespaces (cookies).
    pub fn set_dns_pods(&self, captured: &[u64]) -> Result<usize, DatapathError> {
        self.lock().set_dns_pods(captured)
    }

    /// The resolver the pod in network namespace `cookie` last addressed.
    pub fn dns_resolver(&self, cookie: u64) -> Option<std::net::SocketAddr> {
        self.lock().dns_resolver(cookie)
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

/// Loads the object, reusing the maps pinned in `map_dir`. A pinned map whose layout differs
/// from this agent's (a version that forgot to rename it, or not ours) is unpinned and
/// created anew: the programs still using it keep it until they are replaced.
fn load_reusing_pinned_maps(map_dir: &Path) -> Result<Ebpf, DatapathError> {
    let mut replaced = Vec::new();
    loop {
        let loaded = EbpfLoader::new()
            .default_map_pin_directory(map_dir)
            .load(EBPF_OBJECT);
        match loaded {
            Err(EbpfError::MapError(MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            })) if !replaced.contains(&name) => {
                tracing::warn!(
                    map = %name, property, pinned = actual, expected,
                    "a pinned map has another layout than this agent's: replacing it"
                );
                remove_pin(&map_dir.join(&name))?;
                replaced.push(name);
            }
            loaded => return Ok(loaded?),
        }
    }
}

/// Unpins `path`; one that is already gone is unpinned too.
fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Unpins every pin in `dir` whose name `keep` refuses (directories stay), logging each with
/// `what`; one that cannot be unpinned is logged and left. Returns how many went.
fn unpin_others(dir: &Path, keep: impl Fn(&str) -> bool, what: &str) -> usize {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::error!(dir = %dir.display(), %error, "cannot list the pins; they stay");
            return 0;
        }
    };
    let mut unpinned = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        if entry.file_type().is_ok_and(|t| t.is_dir()) || name.to_str().is_some_and(&keep) {
            continue;
        }
        match remove_pin(&entry.path()) {
            Ok(()) => {
                unpinned += 1;
                tracing::info!(pin = %entry.path().display(), "{what}");
            }
            Err(error) => tracing::error!(%error, "{what}: failed, the pin stays"),
        }
    }
    unpinned
}

/// How long [`remove_pinned`] waits for the kernel to release the unpinned links.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// Detaches everything an agent pinned under `bpffs` and deletes its maps; returns once the
/// kernel has released every link, so that capture has ended when it returns.
pub fn remove_pinned(bpffs: &Path) -> Result<(), DatapathError> {
    if !bpffs.exists() {
        tracing::info!(path = %bpffs.display(), "nothing pinned");
        return Ok(());
    }
    ensure_bpffs(bpffs)?;
    // Only under links/: a map's pin answers the same info call with its map id, which
    // another link may have as its link id (ids are per kind), and a wait for it never ends.
    // That, not the kernel, kept `remove` waiting on 6.1, where ids are small and collide.
    let link_dir = bpffs.join("links");
    let pinned = pinned_links(&link_dir);
    // Unpinning a link drops its last reference, which detaches the program: not at once,
    // though. bpffs frees the inode after an RCU grace period and the link's release runs
    // from a workqueue, so the programs stay attached a while (long enough for a connect to
    // be refused after `remove` returned, seen on a loaded machine). So every link is
    // detached first, synchronously (`detach.rs`), and only the rest is waited for.
    let mut links = BTreeSet::new();
    for (path, id) in &pinned {
        if let Err(error) = detach::detach_pinned(path) {
            tracing::warn!(pin = %path.display(), %error, "cannot detach the pinned link; unpinning it instead");
            links.insert(*id);
        }
    }
    let detached = pinned.len() - links.len();
    std::fs::remove_dir_all(bpffs).map_err(|source| DatapathError::Remove {
        path: bpffs.to_owned(),
        source,
    })?;
    let started = Instant::now();
    loop {
        let attached = attached_links(&links);
        if attached == 0 {
            break;
        }
        if started.elapsed() >= DETACH_WAIT {
            // Who holds them, if a process does (none did when 6.1 under emulation kept them).
            for (link, holder) in link_holders(&links) {
                tracing::error!(link, holder, "an unpinned link is still held open");
            }
            return Err(DatapathError::StillAttached {
                count: attached,
                waited: DETACH_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(
        path = %bpffs.display(),
        detached,
        unpinned = links.len(),
        waited_ms = started.elapsed().as_millis() as u64,
        "datapath removed, every link detached"
    );
    Ok(())
}

/// Which processes hold a descriptor of one of `links` (`(link id, "pid comm")`), from
/// /proc: what keeps a link attached after its pin is gone.
fn link_holders(links: &BTreeSet<u32>) -> Vec<(u32, String)> {
    let mut holders = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return holders;
    };
    for process in processes.filter_map(Result::ok) {
        let pid = process.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let info = process.path().join("fdinfo").join(fd.file_name());
            let Ok(info) = std::fs::read_to_string(info) else {
                continue;
            };
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("link_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok());
            if let Some(id) = id.filter(|id| links.contains(id)) {
                holders.push((id, format!("{pid} {}", comm.trim())));
            }
        }
    }
    holders
}

/// The bpf links pinned anywhere under `dir` with their kernel ids; `dir` must hold links
/// only: a map's pin answers the info call too, with its map id.
fn pinned_links(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut links = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return links;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            links.extend(pinned_links(&path));
        } else if let Ok(link) = PinnedLink::from_pin(&path)
            && let Ok(info) = FdLink::from(link).info()
        {
            links.push((path, info.id()));
        }
    }
    links
}

/// How many of `links` the kernel still holds.
fn attached_links(links: &BTreeSet<u32>) -> usize {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|info| links.contains(&info.id()))
        .count()
}

fn ensure_bpffs(path: &Path) -> Result<(), DatapathError> {
    // The directory may not exist yet: check the closest existing ancestor.
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statfs::statfs(existing) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => Ok(()),
        _ => Err(DatapathError::NotBpffs(path.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map as the object defines it: (name, type, key size, value size, capacity,
    /// flags). Agents that pin a map under the same name share it, so a layout change must
    /// come with a new name (`map_names`, docs/lifecycle.md): update this list only together
    /// with the name.
    const LAYOUTS: [(&str, u32, u32, u32, u32, u32); 11] = [
        ("NM_CAPTURE_CONFIG", 2, 4, 16, 1, 0),
        ("NM_CONN_ORIG_DST", 9, 32, 32, 65536, 0),
        ("NM_DELIVERIES", 9, 20, 1, 65536, 0),
        ("NM_DNS_PODS", 1, 8, 40, 4096, 0),
        ("NM_ENROLLED_CGROUPS", 1, 8, 8, 4096, 0),
        ("NM_EXCLUDED_PORTS", 1, 2, 1, 256, 0),
        ("NM_EXCLUDED_V4", 11, 8, 1, 1024, 1),
        ("NM_EXCLUDED_V6", 11, 20, 1, 1024, 1),
        ("NM_INBOUND_LISTENERS", 18, 20, 4, 8192, 0),
        ("NM_INBOUND_PODS", 1, 20, 8, 8192, 0),
        ("NM_SOCKET_ORIG_DST", 9, 8, 32, 65536, 0),
    ];

    #[test]
    fn a_map_layout_changes_only_with_the_maps_name() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded eBPF object");
        let mut found: Vec<_> = object
            .maps
            .iter()
            .map(|(name, map)| {
                (
                    name.as_str(),
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries(),
                    map.map_flags(),
                )
            })
            .collect();
        found.sort();
        assert_eq!(
            found, LAYOUTS,
            "a map's layout changed: give it a new name in map_names and agent-ebpf \
             (NM_<NAME>_V2), then update LAYOUTS"
        );
        let mut names = map_names::ALL;
        names.sort();
        assert_eq!(names.to_vec(), LAYOUTS.map(|l| l.0).to_vec());
    }

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
