//! Named network namespaces (`/run/netns/<name>`, as `ip netns` keeps them) and work inside them.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use crate::{
    error::{IoContext, Result, TestbedError},
    util::run_checked,
};

/// Where `ip netns` bind-mounts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// `ip netns add` races with itself while it first sets up /run/netns: one at a time per process.
static ADD_LOCK: Mutex<()> = Mutex::new(());

/// The bind-mount path of a named network namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// TCP sockets in TIME_WAIT in the named network namespace `name` (`ss`): what the side
/// that closed a connection first keeps for 60 s.
pub fn time_wait_sockets(name: &str) -> Result<usize> {
    let listed = run_checked(
        Command::new("ip").args(["netns", "exec", name, "ss", "-tanH", "state", "time-wait"]),
        None,
    )?;
    Ok(listed.lines().count())
}

/// The established TCP connections in the named network namespace `name` (`ss`), each as
/// (local, peer) address.
pub fn established_connections(name: &str) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    let listed = run_checked(
        Command::new("ip").args(["netns", "exec", name, "ss", "-tnH", "state", "established"]),
        None,
    )?;
    Ok(listed
        .lines()
        .filter_map(|line| {
            // Recv-Q Send-Q Local Peer: the addresses are the last two columns.
            let mut columns = line.split_whitespace().rev();
            let peer = columns.next()?.parse().ok()?;
            let local = columns.next()?.parse().ok()?;
            Some((local, peer))
        })
        .collect())
}

/// The port HBONE listens on in every meshed pod.
pub const HBONE_PORT: u16 = 15008;

/// The established connections in the named network namespace `name` to or from the HBONE
/// port: the ends of HBONE tunnels' connections in that pod.
pub fn hbone_connections(name: &str) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    let mut connections = established_connections(name)?;
    connections.retain(|(local, peer)| local.port() == HBONE_PORT || peer.port() == HBONE_PORT);
    Ok(connections)
}

/// Creates a named network namespace with `ip netns add`.
pub(crate) fn add(name: &str) -> Result<()> {
    let _guard = ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = None;
    // Another process may be setting up /run/netns at the same moment: retry a few times.
    for attempt in 0..3 {
        match run_checked(Command::new("ip").args(["netns", "add", name]), None) {
            Ok(_) => return Ok(()),
            Err(error) => {
                tracing::debug!(%error, attempt, "ip netns add failed");
                last = Some(error);
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Err(last.unwrap_or_else(|| TestbedError::Other(format!("ip netns add {name} failed"))))
}

/// Removes a named network namespace the way `ip netns del` does (detach the mount, unlink).
pub(crate) fn delete(name: &str) -> Result<()> {
    let path = path(name);
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::ENOENT) | Err(nix::Error::EINVAL) => {}
        Err(source) => {
            return Err(TestbedError::Sys {
                what: format!("unmounting {}", path.display()),
                source,
            });
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).io_context(|| format!("removing {}", path.display())),
    }
}

/// Names of existing named network namespaces that start with `prefix`.
pub(crate) fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Opens a named network namespace (for setns).
pub(crate) fn open(name: &str) -> Result<File> {
    let path = path(name);
    File::open(&path).io_context(|| format!("opening network namespace {}", path.display()))
}

/// Runs `f` on a short-lived thread that has entered the named network namespace.
///
/// setns changes only the calling thread, and sockets keep the namespace they were created in.
pub(crate) fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = open(name)?;
    let name_owned = name.to_owned();
    let handle = thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || -> Result<T> {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .io_context(|| format!("entering network namespace {name_owned}"))?;
            f()
        })
        .io_context(|| "spawning a thread".to_owned())?;
    handle
        .join()
        .map_err(|_| TestbedError::Other(format!("the thread working in netns {name} panicked")))?
}

/// Writes sysctls (paths below /proc/sys, e.g. `net/ipv4/ip_forward`) inside a namespace.
pub(crate) fn write_sysctls(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    in_netns(name, move || {
        // /proc/sys/net resolves against the opening thread's namespace, which is the target's.
        for (key, value) in &settings {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value)
                .io_context(|| format!("writing {value} to {}", path.display()))?;
        }
        Ok(())
    })
}

/// Runs `ip -n <netns> -batch -` with these command lines (fails at the first failing line).
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut input = lines.join("\n");
    input.push('\n');
    tracing::trace!(netns, %input, "ip batch");
    run_checked(
        Command::new("ip").args(["-n", netns, "-batch", "-"]),
        Some(&input),
    )
    .map(|_| ())
}
