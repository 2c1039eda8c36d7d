//! `--cpu-profile DIR`: where an agent spends its CPU during a scenario. `perf record`
//! samples the agent's process (all its threads, user and kernel stacks, DWARF unwinding:
//! the release build keeps no frame pointers) while the scenario runs; afterwards the
//! samples are folded and drawn as a flame graph, `DIR/<name>.svg` (inferno, Rust names
//! demangled), the heaviest frames listed in `DIR/<name>.txt` (by self time and in all) and
//! the folded stacks kept in `DIR/<name>.folded`. The raw `perf.data` is removed: it is
//! large, and the SVG is what docs/ keep.
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
    perf: Child,
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
            perf,
            data,
            svg: dir.join(format!("{name}.svg")),
            title: format!("nodemesh agent (pid {pid}): {name}, CPU samples"),
        })
    }

    /// Stops sampling and writes the top frames and the flame graph; returns the SVG's path,
    /// or the top frames' when the process was never sampled (it had nothing to do: an agent
    /// the scenario's traffic does not pass through), which draws no graph.
    pub(super) fn finish(mut self) -> anyhow::Result<PathBuf> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.perf.id())?),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let status = self.perf.wait()?;
        // perf writes its data and then ends by the signal it was stopped with.
        if !status.success() && status.signal() != Some(nix::libc::SIGINT) {
            bail!("perf record failed: {status}");
        }
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
        Ok(self.svg)
    }
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
        for frame in stack.split(';').filter(|frame| seen.insert(*frame)) {
            *inclusive.entry(frame).or_default() += count;
        }
    }
    let mut out = format!("{total} samples; the frames that spent them (self time):\n");
    list(&mut out, own, total, limit);
    out.push_str("\nthe frames with the most samples in all (self and callees):\n");
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
