//! cgroup v2 directories: finding the hierarchy, creating, emptying and removing subtrees.

use std::{
    fs::{File, OpenOptions},
    io,
    path::{Path, PathBuf},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::error::{IoContext, Result, TestbedError};

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` (unified) or its `unified/` (hybrid).
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(root) = ROOT.get() {
        return Ok(root.clone());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .io_context(|| "reading /proc/self/mountinfo".to_owned())?;
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent dev root mountpoint options [optional...] - fstype source super.
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort_by_key(|p| match p.to_str() {
        Some("/sys/fs/cgroup") => 0,
        Some("/sys/fs/cgroup/unified") => 1,
        _ => 2,
    });
    let root = found.into_iter().next().ok_or_else(|| {
        TestbedError::Other("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo)".into())
    })?;
    Ok(ROOT.get_or_init(|| root).clone())
}

/// Mount points of cgroup v1 hierarchies (a hybrid host has them next to the v2 one). A
/// container runtime creates a container's cgroup in each, so a testbed's name is removed
/// from them too.
pub(crate) fn v1_hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Creates a cgroup directory and its parents.
pub(crate) fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).io_context(|| format!("creating cgroup {}", dir.display()))
}

/// Opens `cgroup.procs` of a cgroup for writing: writing "0" to it moves the writer there.
pub(crate) fn open_procs_for_join(dir: &Path) -> Result<File> {
    let path = dir.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .io_context(|| format!("opening {}", path.display()))
}

/// Every directory of the subtree rooted at `dir`, deepest first (the order rmdir needs).
fn subtree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_owned()];
    let mut index = 0;
    while index < all.len() {
        if let Ok(entries) = std::fs::read_dir(&all[index]) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    all.push(entry.path());
                }
            }
        }
        index += 1;
    }
    all.reverse();
    all
}

/// Pids of every process in the subtree rooted at `dir`.
pub(crate) fn procs(dir: &Path) -> Vec<u32> {
    subtree_deepest_first(dir)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether any process is left in the subtree (from `cgroup.events`, falling back to `procs`).
fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => !procs(dir).is_empty(),
    }
}

/// SIGKILLs every process in the subtree and waits (bounded) until it is empty.
pub(crate) fn kill_all(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, forks included.
        let killed_by_kernel = std::fs::write(dir.join("cgroup.kill"), "1").is_ok();
        if !killed_by_kernel {
            for pid in procs(dir) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if !populated(dir) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestbedError::Other(format!(
                "processes {:?} in cgroup {} survived SIGKILL",
                procs(dir),
                dir.display()
            )));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kills what runs in the subtree, then removes its directories bottom-up.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    kill_all(dir)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    for sub in subtree_deepest_first(dir) {
        loop {
            match std::fs::remove_dir(&sub) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // EBUSY while the last processes are still exiting: kill again and retry.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(cgroup = %sub.display(), error = %e, "rmdir failed, retrying");
                    kill_all(&sub)?;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).io_context(|| format!("removing cgroup {}", sub.display()));
                }
            }
        }
    }
    Ok(())
}
