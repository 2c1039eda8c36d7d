//! `--heap-profile DIR`: the bench's agents (and every other `nodemesh` process of the
//! testbed) run under heaptrack (Debian's `heaptrack`), which records every allocation with
//! its stack. After the run, each process's record is interpreted and summarised in DIR:
//! `<pid>.txt` (heaptrack_print: peak consumers, allocators, temporaries) and
//! `<pid>.peak.svg`, a flame graph of the stacks weighted by the bytes they held at the
//! peak (inferno, with Rust's names demangled). The peak of an agent's record is the moment it held the idle connections, so the
//! summary says what an idle connection is made of.
//!
//! The process is `exec`ed by a small wrapper with heaptrack's preload library, so its pid,
//! its signals and its `/proc` entries are the agent's own, as the testbed expects.
//! `--agent-env` uses the same kind of wrapper to add environment variables (the allocator
//! experiment).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use super::flame;

const PRELOAD: &str = "/usr/lib/heaptrack/libheaptrack_preload.so";
const INTERPRET: &str = "/usr/lib/heaptrack/libexec/heaptrack_interpret";
/// The raw records the preload library writes, one per process.
const RAW_PREFIX: &str = "raw.";

/// Writes a wrapper that runs `binary` under heaptrack, recording into `dir`.
pub(super) fn wrap(binary: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    if !Path::new(PRELOAD).exists() {
        bail!("{PRELOAD} is missing: install Debian's heaptrack (scripts/setup.sh does)");
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = fs::canonicalize(dir)?;
    let assignments = format!(
        "LD_PRELOAD={PRELOAD} DUMP_HEAPTRACK_OUTPUT={}/{RAW_PREFIX}$$",
        dir.display()
    );
    exec_wrapper(&dir.join("nodemesh-under-heaptrack"), &assignments, binary)
}

/// Writes a wrapper that runs `binary` with `env` added (next to the binary); returns it.
/// Like heaptrack's, it `exec`s, so the process is the agent's own.
pub(super) fn with_env(binary: &Path, env: &[(String, String)]) -> anyhow::Result<PathBuf> {
    let assignments: Vec<String> = env
        .iter()
        .map(|(name, value)| format!("{name}='{}'", value.replace('\'', "")))
        .collect();
    exec_wrapper(
        &binary.with_file_name("nodemesh-with-env"),
        &assignments.join(" "),
        binary,
    )
}

/// Writes the script `wrapper` that `exec`s `binary` with its arguments under the shell
/// variable `assignments`; returns its path.
fn exec_wrapper(wrapper: &Path, assignments: &str, binary: &Path) -> anyhow::Result<PathBuf> {
    let script = format!(
        "#!/bin/sh\nexec env {assignments} {} \"$@\"\n",
        binary.display()
    );
    fs::write(wrapper, script)?;
    fs::set_permissions(wrapper, fs::Permissions::from_mode(0o755))?;
    Ok(wrapper.to_path_buf())
}

/// Interprets every raw record in `dir` and writes the summaries; returns the summaries'
/// paths.
pub(super) fn summarise(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut summaries = Vec::new();
    for entry in fs::read_dir(dir)? {
        let raw = entry?.path();
        let Some(pid) = raw
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix(RAW_PREFIX))
            .map(str::to_owned)
        else {
            continue;
        };
        let record = dir.join(format!("heaptrack.nodemesh.{pid}.zst"));
        let interpreted = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{INTERPRET} < '{}' | zstd -q -c > '{}'",
                raw.display(),
                record.display()
            ))
            .status()?;
        if !interpreted.success() {
            bail!("interpreting {} failed", raw.display());
        }
        fs::remove_file(&raw)?;
        let summary = dir.join(format!("{pid}.txt"));
        let folded = dir.join(format!("{pid}.peak.folded"));
        let printed = Command::new("heaptrack_print")
            .arg("--file")
            .arg(&record)
            .args(["--print-peaks", "1", "--print-allocators", "1"])
            .args(["--print-temporary", "1", "--peak-limit", "25"])
            .args(["--flamegraph-cost-type", "peak", "--print-flamegraph"])
            .arg(&folded)
            .stderr(Stdio::null())
            .output()?;
        fs::write(&summary, &printed.stdout)?;
        flame_graph(&folded, &dir.join(format!("{pid}.peak.svg")), &pid)?;
        fs::remove_file(&folded)?;
        summaries.push(summary);
    }
    summaries.sort();
    Ok(summaries)
}

/// Renders heaptrack's folded stacks (`frame;frame;... bytes`) as a flame graph.
fn flame_graph(folded: &Path, svg: &Path, pid: &str) -> anyhow::Result<()> {
    let text = fs::read_to_string(folded)?;
    let lines: Vec<String> = text.lines().filter_map(flame::demangled).collect();
    let title = format!("nodemesh (pid {pid}): heap at its peak");
    flame::render(&lines, svg, &title, "bytes")
}
