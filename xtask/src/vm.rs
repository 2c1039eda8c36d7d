//! `cargo xtask vm-test --kernel <6.1|6.12|VERSION|host>`: the kernel test suite on a given
//! kernel. For a Debian-packaged kernel (installed by `scripts/vm-setup.sh`) it builds a minimal
//! initramfs (busybox, `ip`, the test binaries, the modules the testbed needs, an init script),
//! boots it under qemu with KVM, streams the serial console and reads the suite's exit code
//! from a marker line. `--kernel host` runs the same suite natively. See docs/vm-test.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{self, BufRead, BufReader, BufWriter, Read, Write},
    os::unix::fs::{MetadataExt, PermissionsExt, symlink},
    path::{Component, Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

/// Test targets of `nodemesh-testbed` that make up the kernel suite, run in this order.
const SUITES: &[&str] = &["datapath", "restart"];
/// Kernel modules the testbed needs (pod and node links, the node bridge); their dependencies
/// are found in `modules.dep`. Built-in ones are skipped.
const MODULES: &[&str] = &["veth", "bridge"];
/// Busybox applets the init script uses (`ip` is the real iproute2: the testbed needs
/// `ip netns` and `-batch`, which busybox's `ip` lacks). `true` and `sleep` are for suites
/// that spawn them.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "ln", "cat", "echo", "insmod", "poweroff", "uname", "tail", "ls",
    "sleep", "true", "false",
];
/// Where the binaries live inside the guest.
const GUEST_DIR: &str = "/nodemesh";
/// How much slower than native the guest runs under TCG on the CI machine kind (the suite
/// takes 82–119 s there against 20 s natively, docs/vm-test.md).
const TCG_TIME_SCALE: u32 = 5;

/// Printed by the init script when the suite starts, and with its exit code when it ends.
const START_MARKER: &str = "NODEMESH-VM-TEST-START";
const EXIT_MARKER: &str = "NODEMESH-VM-TEST-EXIT=";
/// Exit code the init script reports when the guest could not be set up (mounts, modules).
const SETUP_FAILED: i32 = 125;

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// `6.1` or `6.12` (the newest installed /boot/vmlinuz-<series>.*), an exact installed
    /// version (e.g. `6.1.0-56-amd64`), or `host` to run the suite natively on this kernel.
    #[arg(long)]
    kernel: String,
    /// How qemu runs the guest: `kvm` (hardware virtualisation), `tcg` (emulation, several
    /// times slower) or `auto` (kvm when /dev/kvm is usable and the CPU has vmx/svm).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Seconds before the VM is killed and the run counted as failed [default: 300 with
    /// kvm, 900 with tcg].
    #[arg(long)]
    timeout: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Extra arguments for the test binaries (after `--`), e.g. a test name filter.
    #[arg(trailing_var_arg = true)]
    test_args: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// The test binaries: the suites and the two programs they start.
struct Binaries {
    nodemesh: PathBuf,
    workload: PathBuf,
    suites: Vec<(String, PathBuf)>,
}

pub fn run(args: &VmTestArgs) -> anyhow::Result<()> {
    if args.kernel == "host" {
        // Fail before a long build if the run cannot happen anyway.
        if !crate::nix_is_root() {
            bail!("the kernel tests load eBPF programs and create network namespaces: run as root");
        }
        let binaries = build()?;
        return run_on_host(&binaries, args);
    }
    let kernel = Kernel::find(&args.kernel)?;
    let accel = match args.accel {
        Accel::Auto => match kvm_usable() {
            Ok(()) => Accel::Kvm,
            Err(reason) => {
                println!("vm-test: using emulation (tcg), not KVM: {reason:#}");
                Accel::Tcg
            }
        },
        Accel::Kvm => {
            kvm_usable()?;
            Accel::Kvm
        }
        Accel::Tcg => Accel::Tcg,
    };
    let binaries = build()?;
    run_in_vm(&kernel, &binaries, accel, args)
}

/// Builds the agent, the workload and the suites' test binaries (without running them).
fn build() -> anyhow::Result<Binaries> {
    let (nodemesh, workload) = crate::build_binaries(false)?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(crate::workspace_root())
        .args(["test", "--package", "nodemesh-testbed", "--no-run"])
        .args(["--message-format", "json"])
        .stderr(Stdio::inherit());
    for suite in SUITES {
        cargo.args(["--test", suite]);
    }
    let output = cargo
        .output()
        .with_context(|| format!("running {cargo:?}"))?;
    if !output.status.success() {
        bail!("{cargo:?} failed: {}", output.status);
    }
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let name = message["target"]["name"].as_str().unwrap_or_default();
        let is_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(path)) = (is_test, message["executable"].as_str()) {
            executables.insert(name.to_owned(), PathBuf::from(path));
        }
    }
    let suites = SUITES
        .iter()
        .map(|suite| {
            executables
                .remove(*suite)
                .map(|path| ((*suite).to_owned(), path))
                .with_context(|| {
                    format!("cargo built no test executable named `{suite}` (see {cargo:?})")
                })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Binaries {
        nodemesh,
        workload,
        suites,
    })
}

fn run_on_host(binaries: &Binaries, args: &VmTestArgs) -> anyhow::Result<()> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    println!("vm-test: host kernel {kernel}, no VM");
    let started = Instant::now();
    let mut failed = Vec::new();
    for (suite, path) in &binaries.suites {
        println!("=== {suite}");
        let status = Command::new(path)
            .arg("--test-threads=1")
            .args(&args.test_args)
            .env("NODEMESH_BIN", &binaries.nodemesh)
            .env("NODEMESH_WORKLOAD_BIN", &binaries.workload)
            .status()
            .with_context(|| format!("running {}", path.display()))?;
        if !status.success() {
            failed.push(format!("{suite} ({status})"));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if failed.is_empty() {
        println!("vm-test: PASS on host kernel {kernel} (run {elapsed:.1} s)");
        Ok(())
    } else {
        bail!(
            "vm-test: FAIL on host kernel {kernel}: {} (run {elapsed:.1} s)",
            failed.join(", ")
        )
    }
}

/// An installed Debian kernel: its image and its modules.
struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

impl Kernel {
    /// The newest installed kernel whose version is `spec` or starts with `spec.` / `spec-`,
    /// preferring the generic flavour over `-cloud-` and `-rt-`.
    fn find(spec: &str) -> anyhow::Result<Self> {
        let advice = "run scripts/vm-setup.sh (as root) to install the 6.1 and 6.12 kernels";
        let entries = fs::read_dir("/boot").with_context(|| format!("reading /boot; {advice}"))?;
        let mut candidates: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
            .filter(|version| {
                version == spec
                    || version.starts_with(&format!("{spec}."))
                    || version.starts_with(&format!("{spec}-"))
            })
            .collect();
        if candidates.is_empty() {
            bail!("no installed kernel matches `{spec}` (no /boot/vmlinuz-{spec}.*): {advice}");
        }
        let special = |v: &str| v.contains("-cloud-") || v.contains("-rt-");
        candidates.sort_by(|a, b| special(b).cmp(&special(a)).then_with(|| natural_cmp(a, b)));
        let version = candidates.pop().unwrap_or_default();
        let kernel = Kernel {
            vmlinuz: Path::new("/boot").join(format!("vmlinuz-{version}")),
            modules: Path::new("/lib/modules").join(&version),
            version,
        };
        if !kernel.modules.join("modules.dep").is_file() {
            bail!(
                "{} has no modules.dep: reinstall the kernel package ({advice}) or run `depmod {}`",
                kernel.modules.display(),
                kernel.version
            );
        }
        File::open(&kernel.vmlinuz).with_context(|| {
            format!(
                "reading {} (Debian installs kernel images readable by root only): run as root",
                kernel.vmlinuz.display()
            )
        })?;
        Ok(kernel)
    }

    /// The modules to load, dependencies first, as (name, path of the module file).
    fn modules_to_load(&self, wanted: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let dep_file = self.modules.join("modules.dep");
        let deps = fs::read_to_string(&dep_file)
            .with_context(|| format!("reading {}", dep_file.display()))?;
        // name -> (relative path, dependency paths)
        let mut table: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        for line in deps.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let deps = rest.split_whitespace().map(str::to_owned).collect();
            table.insert(module_name(path), (path.to_owned(), deps));
        }
        let builtin_file = self.modules.join("modules.builtin");
        let builtin: BTreeSet<String> = fs::read_to_string(&builtin_file)
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();

        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            let name = name.replace('-', "_");
            if builtin.contains(&name) {
                continue;
            }
            let Some((path, deps)) = table.get(&name) else {
                bail!(
                    "module {name} is neither built into {} nor in {}",
                    self.version,
                    dep_file.display()
                );
            };
            // modules.dep lists every (transitive) dependency; loading them last-first works.
            for dep in deps.iter().rev().chain(std::iter::once(path)) {
                let dep_name = module_name(dep);
                if seen.insert(dep_name.clone()) {
                    order.push((dep_name, self.modules.join(dep)));
                }
            }
        }
        Ok(order)
    }
}

/// `kernel/net/bridge/bridge.ko.xz` -> `bridge` (with `-` as `_`, as the kernel names them).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Orders version strings with their digit runs compared as numbers (6.1.0-9 < 6.1.0-10).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (a, b) = (chunks(a), chunks(b));
    for ((a_digit, a), (b_digit, b)) in a.iter().zip(&b) {
        let order = if *a_digit && *b_digit {
            let trim = |s: &str| s.trim_start_matches('0').to_owned();
            let (a, b) = (trim(a), trim(b));
            a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
        } else {
            a.cmp(b)
        };
        if order.is_ne() {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// Whether qemu can boot a stock kernel with KVM here: /dev/kvm opens, and the CPU has
/// hardware virtualisation (vmx/svm). Some cloud VMs offer /dev/kvm without it (PVM, module
/// `kvm_pvm`), which runs only specially built guest kernels: a Debian kernel hangs there.
fn kvm_usable() -> anyhow::Result<()> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("/dev/kvm does not exist (no KVM; on a VM, enable nested virtualisation)")
        }
        Err(e) => {
            return Err(e).context("opening /dev/kvm: run as root or join the kvm group");
        }
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let hardware = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hardware {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        bail!(
            "/dev/kvm exists but the CPU has no vmx/svm{}, so it cannot boot a stock kernel",
            if pvm {
                " (it is PVM: module kvm_pvm)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn find_program(name: &str, dirs: &[&str]) -> anyhow::Result<PathBuf> {
    dirs.iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .with_context(|| {
            format!(
                "{name} not found in {}: run scripts/vm-setup.sh",
                dirs.join(", ")
            )
        })
}

fn run_in_vm(
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
    build_initramfs(
        kernel,
        binaries,
        &args.test_args,
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

    let (accel_args, accel_name, default_timeout) = match accel {
        Accel::Tcg => (["-accel", "tcg,thread=multi", "-cpu", "max"], "tcg", 900),
        _ => (["-accel", "kvm", "-cpu", "host"], "kvm", 300),
    };
    let timeout = args.timeout.unwrap_or(default_timeout);
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

/// Builds the staging tree `root` and archives it into `initramfs` (newc cpio, uncompressed).
fn build_initramfs(
    kernel: &Kernel,
    binaries: &Binaries,
    test_args: &[String],
    time_scale: u32,
    root: &Path,
    initramfs: &Path,
) -> anyhow::Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    for dir in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "var", "modules",
    ] {
        create_dir(&root.join(dir))?;
    }
    create_dir(&root.join(GUEST_DIR.trim_start_matches('/')))?;
    // iproute2 keeps named network namespaces in /var/run/netns.
    make_symlink(Path::new("../run"), &root.join("var/run"))?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .context("writing etc/passwd")?;
    fs::write(root.join("etc/group"), "root:x:0:\n").context("writing etc/group")?;

    // Programs, with every shared library they load.
    let busybox = find_program("busybox", &["/bin", "/usr/bin"])?;
    let ip = find_program("ip", &["/usr/sbin", "/sbin", "/usr/bin", "/bin"])?;
    let mut programs = vec![
        (busybox, root.join("bin/busybox")),
        (ip, root.join("sbin/ip")),
    ];
    let guest_dir = root.join(GUEST_DIR.trim_start_matches('/'));
    programs.push((binaries.nodemesh.clone(), guest_dir.join("nodemesh")));
    programs.push((
        binaries.workload.clone(),
        guest_dir.join("nodemesh-workload"),
    ));
    for (suite, path) in &binaries.suites {
        programs.push((path.clone(), guest_dir.join(suite)));
    }
    let mut libraries = BTreeSet::new();
    for (host, guest) in &programs {
        copy_stripped(host, guest)?;
        libraries.extend(shared_libraries(host)?);
    }
    for library in &libraries {
        install_host_path(root, library)?;
    }
    for applet in APPLETS {
        make_symlink(Path::new("busybox"), &root.join("bin").join(applet))?;
    }

    // Modules, decompressed (busybox insmod reads plain .ko files).
    let modules = kernel.modules_to_load(MODULES)?;
    for (name, path) in &modules {
        decompress_module(path, &root.join("modules").join(format!("{name}.ko")))?;
    }
    let names: Vec<&str> = modules.iter().map(|(name, _)| name.as_str()).collect();
    let init = init_script(&names, test_args, time_scale);
    let init_path = root.join("init");
    fs::write(&init_path, init).context("writing the init script")?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))
        .context("making the init script executable")?;

    write_cpio(root, initramfs)
}

fn create_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn make_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if let Some(parent) = link.parent() {
        create_dir(parent)?;
    }
    symlink(target, link).with_context(|| format!("creating symlink {}", link.display()))
}

/// Copies a program without its debug info (a tenth of the size; symbols stay for backtraces).
fn copy_stripped(host: &Path, guest: &Path) -> anyhow::Result<()> {
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(guest)
        .arg(host)
        .status()
        .is_ok_and(|status| status.success());
    if !stripped {
        // Not an ELF strip understands (or no binutils): the whole file will do.
        fs::copy(host, guest)
            .with_context(|| format!("copying {} to {}", host.display(), guest.display()))?;
    }
    Ok(())
}

/// The shared libraries (and the dynamic loader) a program needs, as `ldd` resolves them.
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd says "not a dynamic executable" (exit 1) for static programs such as busybox-static.
        if String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable")
            || text.contains("not a dynamic executable")
            || text.contains("statically linked")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let path = rest.split_whitespace().next().unwrap_or_default();
                if path == "not" {
                    bail!(
                        "{} needs {} which is not installed",
                        program.display(),
                        name.trim()
                    );
                }
                path
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies a host file to the same path under `root`, recreating the symlinks on the way
/// (`/lib` -> `usr/lib` on merged-/usr Debian), so the guest resolves it like the host.
fn install_host_path(root: &Path, host: &Path) -> anyhow::Result<()> {
    let mut path = host.to_path_buf();
    for _ in 0..40 {
        let mut real = PathBuf::from("/");
        let mut resolved = None;
        let components: Vec<Component> = path.components().collect();
        for (i, component) in components.iter().enumerate().skip(1) {
            let next = real.join(component);
            let meta = fs::symlink_metadata(&next)
                .with_context(|| format!("reading {}", next.display()))?;
            let guest = root.join(next.strip_prefix("/").unwrap_or(&next));
            if meta.file_type().is_symlink() {
                let target =
                    fs::read_link(&next).with_context(|| format!("reading {}", next.display()))?;
                if fs::symlink_metadata(&guest).is_err() {
                    make_symlink(&target, &guest)?;
                }
                let mut continued = normalize(&real.join(&target));
                for rest in &components[i + 1..] {
                    continued.push(rest);
                }
                resolved = Some(continued);
                break;
            } else if meta.is_dir() {
                create_dir(&guest)?;
            } else if fs::symlink_metadata(&guest).is_err() {
                fs::copy(&next, &guest)
                    .with_context(|| format!("copying {} into the initramfs", next.display()))?;
            }
            real = next;
        }
        match resolved {
            Some(next) => path = next,
            None => return Ok(()),
        }
    }
    bail!("too many symbolic links resolving {}", host.display())
}

/// Removes `.` and `..` lexically (valid here: the prefix has no symlinks left).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

fn decompress_module(module: &Path, guest: &Path) -> anyhow::Result<()> {
    let name = module.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    let Some(tool) = tool else {
        fs::copy(module, guest).with_context(|| format!("copying {}", module.display()))?;
        return Ok(());
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(module)
        .output()
        .with_context(|| {
            format!(
                "running {tool} to decompress {}: install it",
                module.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            module.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    fs::write(guest, output.stdout).with_context(|| format!("writing {}", guest.display()))
}

/// Quotes a word for sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn init_script(modules: &[&str], test_args: &[String], time_scale: u32) -> String {
    let suites = SUITES.join(" ");
    let modules = modules.join(" ");
    let test_args: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
    let test_args = test_args.join(" ");
    format!(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test` (xtask/src/vm.rs): set up what the testbed expects, run
# the suites, report the exit code, power off. No API server runs in the guest: the testbed
# keeps its cluster state in manifests.
export PATH=/sbin:/bin HOME=/root RUST_BACKTRACE=1 NODEMESH_TEST_TIME_SCALE={time_scale}
export NODEMESH_TESTBED_CLUSTER=manifests
setup_failed() {{
    echo "NODEMESH-VM-TEST-SETUP-FAILED: $*"
    echo "{EXIT_MARKER}{SETUP_FAILED}"
    poweroff -f
}}
mount -t devtmpfs devtmpfs /dev || setup_failed "mount devtmpfs at /dev"
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc || setup_failed "mount proc"
mount -t sysfs sysfs /sys || setup_failed "mount sysfs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || setup_failed "mount cgroup2 at /sys/fs/cgroup"
mount -t bpf bpf /sys/fs/bpf || setup_failed "mount bpffs at /sys/fs/bpf"
mount -t tmpfs tmpfs /run || setup_failed "mount tmpfs at /run"
mount -t tmpfs tmpfs /tmp || setup_failed "mount tmpfs at /tmp"
for module in {modules}; do
    insmod /modules/$module.ko || setup_failed "insmod $module"
done
ip link set lo up || setup_failed "ip link set lo up"

echo "{START_MARKER} kernel $(uname -r)"
status=0
for suite in {suites}; do
    echo "=== $suite"
    NODEMESH_BIN={GUEST_DIR}/nodemesh NODEMESH_WORKLOAD_BIN={GUEST_DIR}/nodemesh-workload \
        {GUEST_DIR}/$suite --test-threads=1 {test_args}
    code=$?
    [ $status = 0 ] && status=$code
done
if [ $status != 0 ]; then
    # Agent logs of failed tests (the testbed keeps them after a failure).
    for log in /tmp/*-logs/*; do
        [ -f "$log" ] || continue
        echo "--- $log (last 60 lines)"
        tail -n 60 "$log"
    done
fi
echo "{EXIT_MARKER}$status"
poweroff -f
"#
    )
}

/// Writes the tree under `root` as an uncompressed newc cpio archive, plus `/dev/console`
/// (the kernel opens it for init before anything is mounted).
fn write_cpio(root: &Path, archive: &Path) -> anyhow::Result<()> {
    let file = File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut out = BufWriter::new(file);
    let mut ino = 1u32;
    let mut paths = Vec::new();
    collect_tree(root, root, &mut paths)?;
    for relative in &paths {
        let host = root.join(relative);
        let meta =
            fs::symlink_metadata(&host).with_context(|| format!("reading {}", host.display()))?;
        let name = relative.to_string_lossy();
        ino += 1;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host)?;
            let target = target.to_string_lossy();
            cpio_entry(&mut out, ino, meta.mode(), 0, &name, target.as_bytes())?;
        } else if meta.is_dir() {
            cpio_entry(&mut out, ino, meta.mode(), 0, &name, &[])?;
        } else {
            let data = fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
            cpio_entry(&mut out, ino, meta.mode(), 0, &name, &data)?;
        }
    }
    // Character device 5:1, rw for root.
    cpio_entry(
        &mut out,
        ino + 1,
        0o020600,
        (5 << 8) | 1,
        "dev/console",
        &[],
    )?;
    cpio_entry(&mut out, 0, 0, 0, "TRAILER!!!", &[])?;
    out.flush()
        .with_context(|| format!("writing {}", archive.display()))
}

/// Every path under `dir`, relative to `root`, parents before children.
fn collect_tree(root: &Path, dir: &Path, paths: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        paths.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        if entry.file_type()?.is_dir() {
            collect_tree(root, &path, paths)?;
        }
    }
    Ok(())
}

/// One newc entry: header, name, data, each padded to 4 bytes. `rdev` is major << 8 | minor.
fn cpio_entry(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    rdev: u32,
    name: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let name_size = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_size:08x}{:08x}",
        0, // uid: root
        0, // gid: root
        1, // nlink
        0, // mtime: reproducible
        data.len(),
        0, // dev major
        0, // dev minor
        rdev >> 8,
        rdev & 0xff,
        0, // check
    );
    let pad = |n: usize| (4 - n % 4) % 4;
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 4][..pad(header.len() + name_size)])?;
    out.write_all(data)?;
    out.write_all(&[0; 4][..pad(data.len())])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_naturally() {
        let mut versions = vec![
            "6.1.0-10-amd64",
            "6.1.0-9-amd64",
            "6.12.117+deb12-amd64",
            "6.12.99+deb12-amd64",
        ];
        versions.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            versions,
            [
                "6.1.0-9-amd64",
                "6.1.0-10-amd64",
                "6.12.99+deb12-amd64",
                "6.12.117+deb12-amd64"
            ]
        );
    }

    #[test]
    fn module_names_drop_directory_and_compression() {
        assert_eq!(module_name("kernel/net/bridge/bridge.ko.xz"), "bridge");
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
        assert_eq!(module_name("kernel/net/802/nf-x.ko.zst"), "nf_x");
    }

    #[test]
    fn terminal_controls_are_stripped() {
        assert_eq!(
            strip_terminal_controls("\u{1b}c\u{1b}[?7l\u{1b}[2JNODEMESH-VM-TEST-START x\r\n"),
            "NODEMESH-VM-TEST-START x"
        );
        assert_eq!(strip_terminal_controls("a\tb"), "a\tb");
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
