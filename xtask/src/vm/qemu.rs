//! Boots the initramfs under qemu, streams the serial console, and reads the suite's exit
//! code and libtest's summaries from it.

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, BufWriter, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{
    Accel, Binaries, NEEDS_API_SERVER, TCG_TIME_SCALE, VmTestArgs, find_program,
    initramfs::{self, EXIT_MARKER, SETUP_FAILED, START_MARKER},
    kernel::Kernel,
};

pub(super) fn run_in_vm(
    kernel: &Kernel,
    binaries: &Binaries,
    accel: Accel,
    args: &VmTestArgs,
) -> anyhow::Result<()> {
    let qemu = find_program("qemu-system-x86_64", &["/usr/bin", "/usr/local/bin"])?;
    let work = crate::target_dir().join("vm-test").join(&kernel.version);
    let initramfs = work.join("initramfs.cpio");
    let started = Instant::now();
    // Emulation runs the guest several times slower: the tests' responsiveness bounds are
    // stretched accordingly (tests/src/wait.rs `scaled`); with KVM they stay as they are.
    let time_scale = match accel {
        Accel::Tcg => TCG_TIME_SCALE,
        _ => 1,
    };
    initramfs::build(
        kernel,
        binaries,
        &guest_test_args(&args.test_args),
        time_scale,
        &work.join("root"),
        &initramfs,
    )?;
    let size_mib = fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    println!(
        "vm-test: kernel {} ({}), initramfs {size_mib:.0} MiB built in {:.1} s",
        kernel.version,
        kernel.vmlinuz.display(),
        started.elapsed().as_secs_f64()
    );

    let (accel_args, accel_name, seconds_per_suite) = match accel {
        Accel::Tcg => (["-accel", "tcg,thread=multi", "-cpu", "max"], "tcg", 600),
        _ => (["-accel", "kvm", "-cpu", "host"], "kvm", 200),
    };
    let timeout = args
        .timeout
        .unwrap_or(seconds_per_suite * binaries.suites.len() as u64);
    let mut command = Command::new(&qemu);
    command
        .args(accel_args)
        .args(["-nographic", "-no-reboot"])
        .args(["-nic", "none"])
        .args(["-m", &args.memory.to_string()])
        .args(["-smp", &args.cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let console_path = work.join("console.log");
    println!("vm-test: booting with {accel_name}, timeout {timeout} s");
    let outcome = boot(&mut command, Duration::from_secs(timeout), &console_path)?;

    let boot_s = outcome.boot.map(|d| d.as_secs_f64());
    let run_s = match (outcome.boot, outcome.end) {
        (Some(boot), Some(end)) => Some((end - boot).as_secs_f64()),
        _ => None,
    };
    let timing = format!(
        "boot {}, run {}, total {:.1} s",
        boot_s.map_or("-".into(), |s| format!("{s:.1} s")),
        run_s.map_or("-".into(), |s| format!("{s:.1} s")),
        outcome.total.as_secs_f64()
    );
    println!("\nvm-test: console log {}", console_path.display());
    if !outcome.summaries.is_empty() {
        println!("vm-test: {}", outcome.summaries.join("; "));
    }
    if !outcome.failed_tests.is_empty() {
        println!("vm-test: failed tests:");
        for test in &outcome.failed_tests {
            println!("    {test}");
        }
    }
    match outcome.exit_code {
        Some(0) => {
            println!("vm-test: PASS on {} ({timing})", kernel.version);
            Ok(())
        }
        Some(SETUP_FAILED) => bail!(
            "vm-test: the guest could not be set up on {} (see the SETUP-FAILED line above; {timing})",
            kernel.version
        ),
        Some(code) => bail!(
            "vm-test: FAIL on {}: the suite exited with {code} ({timing})",
            kernel.version
        ),
        None if outcome.timed_out && outcome.boot.is_none() => bail!(
            "vm-test: TIMEOUT on {}: the guest never reached init within {timeout} s, qemu \
             killed ({timing}); with --accel kvm on a CPU without vmx/svm (PVM) stock kernels \
             hang like this: use --accel tcg",
            kernel.version,
        ),
        None if outcome.timed_out => bail!(
            "vm-test: TIMEOUT on {}: no result within {timeout} s, qemu killed ({timing}); \
             raise --timeout if the suite is merely slow",
            kernel.version,
        ),
        None => bail!(
            "vm-test: the VM on {} stopped without reporting a result \
             (kernel panic or qemu error: see the console above; {timing}){}",
            kernel.version,
            if outcome.qemu_stderr.trim().is_empty() {
                String::new()
            } else {
                format!("\nqemu: {}", outcome.qemu_stderr.trim())
            }
        ),
    }
}

/// The test binaries' arguments in the guest: the user's, and a `--skip` for each test that
/// needs an API server (whole names: libtest skips tests whose name contains one).
fn guest_test_args(user: &[String]) -> Vec<String> {
    let mut args = user.to_vec();
    for test in NEEDS_API_SERVER {
        args.extend(["--skip".to_owned(), (*test).to_owned()]);
    }
    args
}

/// What one boot of the VM produced.
struct Outcome {
    exit_code: Option<i32>,
    timed_out: bool,
    /// From qemu's start to the start marker, and to the exit marker.
    boot: Option<Duration>,
    end: Option<Duration>,
    total: Duration,
    /// libtest's `test result:` lines and the names of failed tests.
    summaries: Vec<String>,
    failed_tests: Vec<String>,
    qemu_stderr: String,
}

/// Runs qemu, streams its console to stdout and `console_path`, and reads the markers.
fn boot(command: &mut Command, timeout: Duration, console_path: &Path) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let mut stderr = child.stderr.take().context("qemu's stderr")?;
    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buffer = Vec::new();
        // Lines end in \r\n on the serial console; a guest may print invalid UTF-8.
        while reader.read_until(b'\n', &mut buffer).is_ok_and(|n| n > 0) {
            let line = strip_terminal_controls(&String::from_utf8_lossy(&buffer));
            if lines_tx.send(line).is_err() {
                break;
            }
            buffer.clear();
        }
    });
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut console = BufWriter::new(
        File::create(console_path)
            .with_context(|| format!("creating {}", console_path.display()))?,
    );
    let mut outcome = Outcome {
        exit_code: None,
        timed_out: false,
        boot: None,
        end: None,
        total: Duration::ZERO,
        summaries: Vec::new(),
        failed_tests: Vec::new(),
        qemu_stderr: String::new(),
    };
    let deadline = started + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            outcome.timed_out = true;
            break;
        }
        match lines.recv_timeout(deadline - now) {
            Ok(line) => {
                println!("{line}");
                let _ = writeln!(console, "{line}");
                if line.contains(START_MARKER) {
                    outcome.boot = Some(started.elapsed());
                } else if let Some((_, code)) = line.split_once(EXIT_MARKER) {
                    outcome.end = Some(started.elapsed());
                    outcome.exit_code = Some(code.trim().parse().unwrap_or(-1));
                } else if line.starts_with("test result:") {
                    outcome.summaries.push(line.clone());
                } else if let Some(test) = line
                    .strip_prefix("---- ")
                    .and_then(|rest| rest.strip_suffix(" stdout ----"))
                {
                    // libtest's header over a failed test's output (its `... FAILED` line is
                    // often broken by what workloads print meanwhile).
                    outcome.failed_tests.push(test.to_owned());
                }
            }
            // qemu closed its console: it has exited (poweroff, panic with -no-reboot, error).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.timed_out = true;
                break;
            }
        }
    }
    let _ = console.flush();
    // After the exit marker the guest powers off at once; give it a moment, then kill.
    stop(&mut child, Duration::from_secs(10));
    outcome.total = started.elapsed();
    outcome.qemu_stderr = stderr_reader.join().unwrap_or_default();
    Ok(outcome)
}

/// Drops the line end and the terminal control sequences SeaBIOS and the kernel print (a
/// terminal reset, `ESC c`, among them), which would otherwise act on the user's terminal.
fn strip_terminal_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI (ESC [ ... final byte in @..~) or a two-character sequence (ESC c, ESC 7).
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' | '\n' => {}
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

fn stop(child: &mut Child, grace: Duration) {
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_stripped() {
        assert_eq!(
            strip_terminal_controls("\u{1b}c\u{1b}[?7l\u{1b}[2JNODEMESH-VM-TEST-START x\r\n"),
            "NODEMESH-VM-TEST-START x"
        );
        assert_eq!(strip_terminal_controls("a\tb"), "a\tb");
    }
}
