//! Tracking what a testbed created, tearing it down, and finding what was left behind.
//!
//! Every testbed's resources live in a shared, registered [`Resources`] from the first moment
//! of creation, so a half-built testbed, a dropped one and one torn down from a Ctrl-C handler
//! are all cleaned up the same way.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    process::Child,
    sync::{Arc, Mutex, MutexGuard, Weak},
};

use crate::{
    agent::AgentProcess,
    cgroup,
    containerd::{Containerd, mounts_under},
    error::{IoContext, Result},
    naming, netns,
};

/// A process the testbed owns (a pod's pause process, a detached workload).
#[derive(Debug)]
pub(crate) struct Tracked {
    pub what: String,
    pub pod: Option<String>,
    pub child: Child,
}

/// Everything a testbed has created so far.
#[derive(Debug)]
pub(crate) struct Resources {
    pub name: String,
    pub netns: Vec<String>,
    pub children: Vec<Tracked>,
    pub agents: BTreeMap<String, AgentProcess>,
    /// Agents a successor was started next to (upgrade-style overlap), still draining.
    pub previous_agents: BTreeMap<String, AgentProcess>,
    /// The testbed's containerd, stopped first at teardown (its daemon is in `children`).
    pub container_runtime: Option<Containerd>,
    pub torn_down: bool,
}

/// Resources shared between the testbed, its registry entry and its process handles.
pub(crate) type Shared = Arc<Mutex<Resources>>;

/// Locks a mutex even if a panicking thread poisoned it (cleanup must still run).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `teardown` did not manage to remove, and the errors it met on the way.
#[derive(Clone, Debug, Default)]
pub struct TeardownReport {
    /// The testbed's name.
    pub name: String,
    /// Objects still present after teardown (network namespaces, directories); empty is good.
    pub leftovers: Vec<String>,
    /// Errors met while removing things (teardown goes on after each).
    pub errors: Vec<String>,
}

impl TeardownReport {
    /// Whether nothing was left behind and nothing failed.
    pub fn is_clean(&self) -> bool {
        self.leftovers.is_empty() && self.errors.is_empty()
    }
}

/// Live testbeds of this process, for `teardown_all_registered` (e.g. from a Ctrl-C handler).
static REGISTRY: Mutex<Vec<(String, Weak<Mutex<Resources>>)>> = Mutex::new(Vec::new());

/// Creates and registers the resource record of a new testbed.
pub(crate) fn register(name: &str) -> Shared {
    let shared = Arc::new(Mutex::new(Resources {
        name: name.to_owned(),
        netns: Vec::new(),
        children: Vec::new(),
        agents: BTreeMap::new(),
        previous_agents: BTreeMap::new(),
        container_runtime: None,
        torn_down: false,
    }));
    let mut registry = lock(&REGISTRY);
    registry.retain(|(_, weak)| weak.strong_count() > 0);
    registry.push((name.to_owned(), Arc::downgrade(&shared)));
    shared
}

fn unregister(name: &str) {
    lock(&REGISTRY).retain(|(n, weak)| n != name && weak.strong_count() > 0);
}

fn is_registered(name: &str) -> bool {
    lock(&REGISTRY)
        .iter()
        .any(|(n, weak)| n == name && weak.strong_count() > 0)
}

/// Tears down every live testbed of this process; for Ctrl-C handlers. Returns their reports.
pub fn teardown_all_registered() -> Vec<TeardownReport> {
    let live: Vec<Shared> = lock(&REGISTRY)
        .iter()
        .filter_map(|(_, weak)| weak.upgrade())
        .collect();
    live.iter().map(teardown).collect()
}

/// Kills, reaps and removes everything the testbed created; then lists what is left.
pub(crate) fn teardown(shared: &Shared) -> TeardownReport {
    let mut res = lock(shared);
    let name = res.name.clone();
    let mut errors = Vec::new();
    if !res.torn_down {
        tracing::debug!(testbed = %name, "tearing down");
        // Containers first, through their runtime, so that it removes what it made for them.
        if let Some(runtime) = res.container_runtime.take() {
            errors.extend(runtime.shutdown());
        }
        let previous = std::mem::take(&mut res.previous_agents);
        for (node, mut agent) in std::mem::take(&mut res.agents).into_iter().chain(previous) {
            if let Err(error) = agent.kill_and_reap() {
                errors.push(format!("killing the agent of {node}: {error}"));
            }
        }
        for mut tracked in std::mem::take(&mut res.children) {
            if let Err(error) = kill_and_reap(&mut tracked.child) {
                errors.push(format!("killing {}: {error}", tracked.what));
            }
        }
        let created = std::mem::take(&mut res.netns);
        errors.extend(remove_by_name(&name, &created).1);
        res.torn_down = true;
    }
    drop(res);
    unregister(&name);
    let leftovers = leftovers(&name);
    if !leftovers.is_empty() || !errors.is_empty() {
        tracing::warn!(testbed = %name, ?leftovers, ?errors, "teardown incomplete");
    }
    TeardownReport {
        name,
        leftovers,
        errors,
    }
}

/// SIGKILLs a child (if still running) and reaps it.
pub(crate) fn kill_and_reap(child: &mut Child) -> io::Result<()> {
    if child.try_wait()?.is_none() {
        // Already exited between the check and the kill is fine: it is still unreaped.
        let _ = child.kill();
    }
    child.wait().map(|_| ())
}

/// Removes every object named after testbed `name`; returns (what was removed, errors).
fn remove_by_name(name: &str, extra_netns: &[String]) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    // Processes first: they keep network namespaces alive and cgroups busy.
    match naming::cgroup_dir(name) {
        Ok(dir) if dir.exists() => match cgroup::remove_tree(&dir) {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(error) => errors.push(error.to_string()),
        },
        Ok(_) => {}
        Err(error) => errors.push(error.to_string()),
    }
    // A container runtime made the containers' cgroups in the v1 hierarchies too.
    for dir in cgroup::v1_hierarchies()
        .iter()
        .map(|hierarchy| hierarchy.join(name))
        .filter(|dir| dir.exists())
    {
        match cgroup::remove_tree(&dir) {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(error) => errors.push(error.to_string()),
        }
    }
    // Images' root filesystems mounted for containers keep the runtime's directory busy.
    let runtime_dir = naming::container_runtime_dir(name);
    for mount in mounts_under(&runtime_dir) {
        if let Err(error) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            errors.push(format!("unmounting {}: {error}", mount.display()));
        }
    }
    let mut namespaces = netns::list_with_prefix(&naming::netns_prefix(name));
    namespaces.extend(
        extra_netns
            .iter()
            .filter(|n| netns::path(n).exists())
            .cloned(),
    );
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        match netns::delete(&ns) {
            Ok(()) => removed.push(format!("netns {ns}")),
            Err(error) => errors.push(error.to_string()),
        }
    }
    for dir in [
        naming::bpffs_dir(name),
        naming::cluster_state_dir(name),
        naming::control_plane_dir(name),
        naming::run_dir(name),
        runtime_dir,
    ] {
        match remove_dir_all(&dir) {
            Ok(true) => removed.push(format!("directory {}", dir.display())),
            Ok(false) => {}
            Err(error) => errors.push(error.to_string()),
        }
    }
    (removed, errors)
}

/// `remove_dir_all` that treats a missing directory as done; Ok(true) if it removed something.
fn remove_dir_all(dir: &Path) -> Result<bool> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).io_context(|| format!("removing {}", dir.display())),
    }
}

/// Everything named after testbed `name` that still exists: netns, cgroup, bpffs, cluster state.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut found: Vec<String> = netns::list_with_prefix(&naming::netns_prefix(name))
        .into_iter()
        .map(|ns| format!("netns {ns}"))
        .collect();
    let mut dirs: Vec<PathBuf> = vec![
        naming::bpffs_dir(name),
        naming::cluster_state_dir(name),
        naming::control_plane_dir(name),
        naming::container_runtime_dir(name),
        naming::run_dir(name),
    ];
    dirs.extend(
        cgroup::v1_hierarchies()
            .iter()
            .map(|hierarchy| hierarchy.join(name)),
    );
    match naming::cgroup_dir(name) {
        Ok(dir) => dirs.insert(0, dir),
        Err(error) => found.push(format!("cgroup root unknown: {error}")),
    }
    for dir in dirs {
        if dir.exists() {
            let procs = cgroup::procs(&dir);
            if procs.is_empty() {
                found.push(format!("directory {}", dir.display()));
            } else {
                found.push(format!("directory {} (processes {procs:?})", dir.display()));
            }
        }
    }
    found
}

/// Names of testbeds with this prefix that have objects on this machine.
fn names_with_prefix(prefix: &str) -> Vec<(String, u32)> {
    let mut entries: Vec<String> = netns::list_with_prefix(prefix);
    let mut dirs = vec![PathBuf::from(naming::BPFFS_ROOT), std::env::temp_dir()];
    if let Ok(root) = cgroup::cgroup2_root() {
        dirs.push(root);
    }
    for dir in dirs {
        if let Ok(read) = std::fs::read_dir(&dir) {
            entries.extend(
                read.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(prefix)),
            );
        }
    }
    let mut names: Vec<(String, u32)> = entries
        .iter()
        .filter_map(|e| naming::parse_owner(prefix, e))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Removes leftovers of testbeds with this prefix whose owner process is gone; returns them.
pub fn sweep_stale(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for (name, owner) in names_with_prefix(prefix) {
        let ours = owner == std::process::id();
        // A live owner still uses its testbed; our own pid counts only if not registered.
        let stale = if ours {
            !is_registered(&name)
        } else {
            !crate::util::pid_alive(owner)
        };
        if !stale {
            continue;
        }
        let (gone, errors) = remove_by_name(&name, &[]);
        for error in errors {
            tracing::warn!(testbed = %name, %error, "sweeping a stale testbed");
        }
        removed.extend(gone.into_iter().map(|what| format!("{name}: {what}")));
    }
    removed
}

/// Removes whatever exists under this exact testbed name (a dead process's name we reuse).
pub(crate) fn remove_stale_name(name: &str) -> Vec<String> {
    remove_by_name(name, &[]).1
}
