//! Starting a process inside a given network namespace and cgroup.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command},
    sync::mpsc,
    thread,
    time::Duration,
};

use nix::{
    sys::{
        signal::{Signal, kill},
        wait::{Id, WaitPidFlag, waitid},
    },
    unistd::Pid,
};

use crate::{
    cgroup,
    error::{IoContext, Result},
    netns,
};

/// Where a process should run: a cgroup and (unless it stays in the host's) a network
/// namespace, both opened before fork.
pub(crate) struct Placement {
    netns: Option<File>,
    cgroup_procs: File,
    description: String,
}

impl Placement {
    /// Opens the named network namespace and the cgroup's `cgroup.procs`.
    pub(crate) fn new(netns_name: &str, cgroup_dir: &Path) -> Result<Self> {
        Ok(Self {
            netns: Some(netns::open(netns_name)?),
            cgroup_procs: cgroup::open_procs_for_join(cgroup_dir)?,
            description: format!("netns {netns_name}, cgroup {}", cgroup_dir.display()),
        })
    }

    /// The cgroup only: the process keeps the host's network namespace.
    pub(crate) fn in_cgroup(cgroup_dir: &Path) -> Result<Self> {
        Ok(Self {
            netns: None,
            cgroup_procs: cgroup::open_procs_for_join(cgroup_dir)?,
            description: format!("cgroup {}", cgroup_dir.display()),
        })
    }

    /// Spawns `command` so that it joins the cgroup and the network namespace before exec.
    pub(crate) fn spawn(&self, command: &mut Command) -> Result<Child> {
        let netns_fd = self.netns.as_ref().map(AsRawFd::as_raw_fd);
        let procs_fd = self.cgroup_procs.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only makes two async-signal-safe
        // system calls on fds that `self` keeps open until `spawn` has returned.
        unsafe {
            command.pre_exec(move || {
                // Join the cgroup first, so even a failing setns leaves nothing outside it.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(netns_fd) = netns_fd
                    && libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .spawn()
            .io_context(|| format!("spawning {program} in {}", self.description))
    }
}

/// Waits for `child` for at most `timeout`, SIGKILLing it then; returns whether it timed out.
pub(crate) fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<bool> {
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (cancel, cancelled) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(timeout) {
            // The child is not reaped before the watchdog is joined, so the pid is still its.
            let _ = kill(pid, Signal::SIGKILL);
            return true;
        }
        false
    });
    // WNOWAIT: learn that it exited without reaping it, so the pid stays valid for the watchdog.
    let waited = loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::Error::EINTR) => continue,
            other => break other,
        }
    };
    drop(cancel);
    let timed_out = watchdog.join().unwrap_or(false);
    waited.io_context(|| format!("waiting for pid {pid}"))?;
    Ok(timed_out)
}
