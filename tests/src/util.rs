//! Small helpers shared by the modules: running commands, random identifiers, process checks.

use std::{
    fs::File,
    io::{Read, Write},
    process::{Command, Stdio},
};

use crate::error::{IoContext, Result, TestbedError};

/// Runs a command to completion, feeding `stdin`; fails with its stderr if it exits non-zero.
pub(crate) fn run_checked(command: &mut Command, stdin: Option<&str>) -> Result<String> {
    let described = format!("{command:?}");
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .io_context(|| format!("spawning {described}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .io_context(|| format!("writing the input of {described}"))?;
    }
    let output = child
        .wait_with_output()
        .io_context(|| format!("waiting for {described}"))?;
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if let Some(input) = stdin {
            stderr.push_str(&format!("\ninput was:\n{input}"));
        }
        return Err(TestbedError::Command {
            command: described,
            status: output.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `N` bytes from the kernel's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .io_context(|| "reading /dev/urandom".to_owned())?;
    Ok(bytes)
}

/// A random UUID v4 in its usual text form, as the API server assigns to pods.
pub(crate) fn uuid_v4() -> Result<String> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// A random 64-hex-digit id, the form of containerd container ids.
pub(crate) fn container_id() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a process with this pid exists (zombies count as existing).
pub(crate) fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether this process runs as root (the testbed needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Resident memory of a process (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).io_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| TestbedError::Other(format!("no VmRSS in {path}")))
}

/// CPU time a process has used so far (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).io_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    let ticks = |index: usize| fields.get(index).and_then(|v| v.parse::<u64>().ok());
    let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
        return Err(TestbedError::Other(format!("no CPU times in {path}")));
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((user + system) as f64 / per_second)
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub(crate) fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
