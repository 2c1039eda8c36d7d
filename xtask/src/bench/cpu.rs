//! `--cpu-profile DIR`: where an agent spends its CPU during a scenario. `perf record`
//! samples the agent's process (all its threads, user and kernel stacks, DWARF unwinding:
//! the release build keeps no frame pointers) while the scenario runs; afterwards the
//! samples are folded and drawn as a flame graph, `DIR/<name>.svg` (inferno, Rust names
//! demangled), the heaviest frames listed in `DIR/<name>.txt` (by self time, by part of the
//! data path, by system call, and in all) and the folded stacks kept in
//! `DIR/<name>.folded`. The raw `perf.data` is removed: it is large, and the SVG is what
//! docs/ keep.
//!
//! perf starts with its events disabled and is told to enable them through its control
//! FIFO; its acknowledgement on the second FIFO says sampling has begun, so the scenario
//! starts only then.

use std::{
    collections::HashMap,
    fs,
    io::{BufReader, Read, Write},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};
use inferno::collapse::{
    Collapse,
    perf::{Folder, Options as FoldOptions},
};

use super::flame;

/// Samples per second and thread.
const FREQUENCY: &str = "999";

/// A `perf record` of one process in progress.
pub(super) struct CpuProfile {
    /// Until it is stopped.
    perf: Option<Child>,
    data: PathBuf,
    svg: PathBuf,
    title: String,
}

impl CpuProfile {
    /// Starts sampling `pid`; the profile is named `name` in `dir`.
    pub(super) fn start(pid: u32, dir: &Path, name: &str) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let data = dir.join(format!("{name}.perf.data"));
        let (control, ack) = (
            dir.join(format!("{name}.ctl")),
            dir.join(format!("{name}.ack")),
        );
        for fifo in [&control, &ack] {
            let _ = fs::remove_file(fifo);
            nix::unistd::mkfifo(
                fifo,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .with_context(|| format!("mkfifo {}", fifo.display()))?;
        }
        let perf = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                FREQUENCY,
                "--call-graph",
                "dwarf,16384",
            ])
            .args(["-D", "-1", "--control"])
            .arg(format!("fifo:{},{}", control.display(), ack.display()))
            .args(["-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .spawn()
            .context("running perf (scripts/setup.sh installs linux-perf)")?;
        // Opening the FIFOs waits for perf to open its ends.
        fs::OpenOptions::new()
            .write(true)
            .open(&control)?
            .write_all(b"enable\n")?;
        let mut acknowledged = [0; 4];
        fs::File::open(&ack)?.read_exact(&mut acknowledged)?;
        for fifo in [&control, &ack] {
            fs::remove_file(fifo)?;
        }
        if &acknowledged != b"ack\n" {
            bail!("perf did not acknowledge enabling its events");
        }
        Ok(Self {
            perf: Some(perf),
            data,
            svg: dir.join(format!("{name}.svg")),
            title: format!("nodemesh agent (pid {pid}): {name}, CPU samples"),
        })
    }

    /// Stops sampling (perf writes its data as it ends); nothing the process does after
    /// this is in the profile.
    pub(super) fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut perf) = self.perf.take() else {
            return Ok(());
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(perf.id())?),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let status = perf.wait()?;
        // perf writes its data and then ends by the signal it was stopped with.
        if !status.success() && status.signal() != Some(nix::libc::SIGINT) {
            bail!("perf record failed: {status}");
        }
        Ok(())
    }

    /// Stops sampling if that was not done yet, and writes the top frames and the flame
    /// graph; returns the SVG's path, or the top frames' when the process was never sampled
    /// (it had nothing to do: an agent the scenario's traffic does not pass through), which
    /// draws no graph.
    pub(super) fn finish(mut self) -> anyhow::Result<PathBuf> {
        self.stop()?;
        let script = Command::new("perf")
            .args(["script", "-F", "comm,tid,time,event,ip,sym,dso", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        fs::remove_file(&self.data)?;
        let mut folded = Vec::new();
        Folder::from(FoldOptions::default())
            .collapse(BufReader::new(&script.stdout[..]), &mut folded)
            .context("folding perf's stacks")?;
        let folded = String::from_utf8_lossy(&folded);
        let lines: Vec<String> = folded.lines().filter_map(flame::demangled).collect();
        let top = self.svg.with_extension("txt");
        fs::write(&top, top_frames(&lines, 40))?;
        // The folded stacks too, for questions the graph does not answer at a glance.
        fs::write(self.svg.with_extension("folded"), lines.join("\n"))?;
        if lines.is_empty() {
            return Ok(top);
        }
        flame::render(&lines, &self.svg, &self.title, "samples")?;
        Ok(self.svg.clone())
    }
}

impl Drop for CpuProfile {
    /// A scenario that failed leaves no perf behind.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The parts of the data path a profile is read by: a name and the frames (substrings of a
/// frame's name) that put a sample in it. A sample counts towards every part one of its
/// frames matches, so parts nest (the HTTP/1 server's task runs the request's handling).
const PARTS: &[(&str, &[&str])] = &[
    (
        "HTTP/1 server (hyper; the L7 request's task)",
        &["role::Server"],
    ),
    (
        "  the request's handling (route, balance, pool, telemetry)",
        &["outbound::request::handle"],
    ),
    (
        "  upstream pool (HTTP client side)",
        &["UpstreamPool>::send"],
    ),
    ("  access log", &["AccessLog"]),
    ("  metrics", &["telemetry::metrics"]),
    ("HTTP/1 client (hyper)", &["role::Client"]),
    ("HTTP/2 in hyper (L7 connections)", &["hyper::proto::h2"]),
    ("HTTP/2 (h2: HBONE, and hyper's HTTP/2)", &["h2::"]),
    ("TLS (rustls, AES-GCM)", &["rustls::", "aws_lc"]),
    ("relay (L4 connections and tunnels)", &["proxy::relay"]),
    (
        "kernel: TCP send (with the receiver's softirq)",
        &["tcp_sendmsg"],
    ),
    ("kernel: TCP receive", &["tcp_recvmsg"]),
    ("waiting for events (epoll_wait)", &["epoll_wait"]),
    ("context switches", &["finish_task_switch"]),
    ("allocator", &["_rjem_", "je_"]),
];

/// The share of samples in each of [`PARTS`].
fn parts(lines: &[String], total: u64) -> String {
    let mut out =
        String::from("\nby part of the data path (a sample counts in every part on its stack):\n");
    for (name, patterns) in PARTS {
        let count: u64 = lines
            .iter()
            .filter_map(|line| line.rsplit_once(' '))
            .filter(|(stack, _)| patterns.iter().any(|pattern| stack.contains(pattern)))
            .map(|(_, count)| count.parse::<u64>().unwrap_or(0))
            .sum();
        out.push_str(&format!(
            "{:5.1}%  {count:6}  {name}\n",
            count as f64 * 100.0 / total.max(1) as f64
        ));
    }
    out
}

/// The samples in user space, and in the kernel by the system call they were made in (the
/// first frame past `do_syscall_64` and its dispatcher: `__x64_sys_sendto` is `sendto`), or
/// in an interrupt or exception.
fn system_calls(lines: &[String], total: u64, limit: usize) -> String {
    let mut calls: HashMap<&str, u64> = HashMap::new();
    for (stack, count) in lines.iter().filter_map(|line| line.rsplit_once(' ')) {
        let count = count.parse::<u64>().unwrap_or(0);
        let mut frames = stack.split(';');
        let call = if stack.contains("entry_SYSCALL_64") {
            frames
                .skip_while(|frame| *frame != "do_syscall_64")
                .skip(1)
                .find(|frame| *frame != "x64_sys_call")
                .and_then(|entry| {
                    ["__x64_sys_", "__do_sys_", "ksys_"]
                        .iter()
                        .find_map(|prefix| entry.strip_prefix(prefix))
                })
                .unwrap_or("(entering and leaving the kernel)")
        } else if frames.any(|frame| frame.starts_with("asm_")) {
            "(interrupts and exceptions)"
        } else {
            "(user space)"
        };
        *calls.entry(call).or_default() += count;
    }
    let mut out = String::from("\nin user space, and in the kernel by system call:\n");
    list(&mut out, calls, total, limit);
    out
}

/// Frames every stack passes through on its way to the work: the runtime, the standard
/// library, the thread's start, the system call entry. The inclusive list leaves them out.
fn is_plumbing(frame: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "tokio::runtime",
        "<tokio::runtime",
        "std::",
        "<std::",
        "core::",
        "<core::",
        "tokio-rt-worker",
        "[unknown]",
        "entry_SYSCALL",
        "do_syscall_64",
        "__libc_start",
        "_start",
        "start_thread",
        "clone3",
    ];
    PREFIXES.iter().any(|prefix| frame.starts_with(prefix))
}

/// The `limit` frames with the most samples on their own (the leaves), and the `limit`
/// with the most samples in all (the frame and what it called; a frame that recurses counts
/// once per stack), each with its share.
fn top_frames(lines: &[String], limit: usize) -> String {
    let mut own: HashMap<&str, u64> = HashMap::new();
    let mut inclusive: HashMap<&str, u64> = HashMap::new();
    let mut total = 0;
    for line in lines {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        total += count;
        *own.entry(stack.rsplit(';').next().unwrap_or(stack))
            .or_default() += count;
        let mut seen = std::collections::HashSet::new();
        for frame in stack
            .split(';')
            .filter(|frame| !is_plumbing(frame) && seen.insert(*frame))
        {
            *inclusive.entry(frame).or_default() += count;
        }
    }
    let mut out = format!("{total} samples; the frames that spent them (self time):\n");
    list(&mut out, own, total, limit);
    out.push_str(&parts(lines, total));
    out.push_str(&system_calls(lines, total, limit));
    out.push_str(
        "\nthe frames with the most samples in all (self and callees; the runtime's and the \
         standard library's left out):\n",
    );
    list(&mut out, inclusive, total, limit);
    out
}

fn list(out: &mut String, frames: HashMap<&str, u64>, total: u64, limit: usize) {
    let mut frames: Vec<_> = frames.into_iter().collect();
    frames.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
    for (frame, count) in frames.into_iter().take(limit) {
        out.push_str(&format!(
            "{:5.1}%  {count:6}  {frame}\n",
            count as f64 * 100.0 / total.max(1) as f64
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::system_calls;

    #[test]
    fn samples_are_told_apart_by_system_call() {
        let lines = [
            "worker;send;entry_SYSCALL_64;do_syscall_64;__x64_sys_sendto;tcp_sendmsg 6",
            "worker;ns;entry_SYSCALL_64;do_syscall_64;x64_sys_call;__do_sys_setns;switch 1",
            "worker;entry_SYSCALL_64;do_syscall_64 1",
            "worker;relay;poll 2",
            "worker;relay;asm_sysvec_apic_timer_interrupt;handle 1",
        ]
        .map(String::from);
        let listed = system_calls(&lines, 11, 10);
        for expected in [
            " 54.5%       6  sendto",
            "  9.1%       1  setns",
            "  9.1%       1  (entering and leaving the kernel)",
            " 18.2%       2  (user space)",
            "  9.1%       1  (interrupts and exceptions)",
        ] {
            assert!(listed.contains(expected), "{expected:?} in\n{listed}");
        }
    }
}
