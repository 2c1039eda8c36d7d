//! `cargo xtask vm-test --kernel <6.1|6.12|VERSION|host>`: the kernel test suite on a given
//! kernel. For a Debian-packaged kernel (installed by `scripts/vm-setup.sh`) it builds a minimal
//! initramfs (busybox, `ip`, the test binaries, the modules the testbed needs, an init script),
//! boots it under qemu with KVM, streams the serial console and reads the suite's exit code
//! from a marker line. `--kernel host` runs the same suite natively. See docs/vm-test.md.
//!
//! `kernel` finds the installed kernel and its modules, `initramfs` builds the guest's root,
//! `qemu` boots it and reads the result.

mod initramfs;
mod kernel;
mod qemu;

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};
use serde_json::Value;

use kernel::Kernel;

/// Test targets of `nodemesh-testbed` that make up the kernel suite, run in this order: the
/// capture hooks, restart reconciliation, STRICT and inbound capture (sk_lookup,
/// IP_TRANSPARENT), mTLS (HBONE), DNS capture (cgroup sendmsg/recvmsg) and inbound UDP
/// denial (sk_lookup on UDP). Security properties are held on the 6.1 floor too.
const SUITES: &[&str] = &[
    "datapath",
    "restart",
    "inbound",
    "mtls",
    "dns",
    "inbound_udp",
];
/// Tests of those suites that need a real API server, which the guest does not run (its
/// testbed keeps the cluster state in manifests). They prove the CA's TokenReview checks, a
/// control-plane property, not a kernel one, and run natively in CI.
const NEEDS_API_SERVER: &[&str] =
    &["the_ca_refuses_tokens_for_another_audience_or_of_another_service_account"];
/// Where the binaries live inside the guest.
const GUEST_DIR: &str = "/nodemesh";
/// How much slower than native the guest runs under TCG on the CI machine kind (the suite
/// takes 82–119 s there against 20 s natively, docs/vm-test.md).
const TCG_TIME_SCALE: u32 = 5;

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
    /// Seconds before the VM is killed and the run counted as failed [default: 200 per suite
    /// with kvm, 600 per suite with tcg].
    #[arg(long)]
    timeout: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// A suite to run (repeatable) [default: all of datapath, restart, inbound, mtls, dns,
    /// inbound_udp].
    #[arg(long = "suite", value_parser = clap::builder::PossibleValuesParser::new(SUITES))]
    suites: Vec<String>,
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
        let binaries = build(&args.selected_suites())?;
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
    let binaries = build(&args.selected_suites())?;
    qemu::run_in_vm(&kernel, &binaries, accel, args)
}

impl VmTestArgs {
    /// The suites asked for, in the suite's order.
    fn selected_suites(&self) -> Vec<&'static str> {
        SUITES
            .iter()
            .copied()
            .filter(|suite| self.suites.is_empty() || self.suites.iter().any(|s| s == suite))
            .collect()
    }
}

/// Builds the agent, the workload and the suites' test binaries (without running them).
fn build(selected: &[&str]) -> anyhow::Result<Binaries> {
    let (nodemesh, workload) = crate::build_binaries(false)?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(crate::workspace_root())
        .args(["test", "--package", "nodemesh-testbed", "--no-run"])
        .args(["--message-format", "json"])
        .stderr(Stdio::inherit());
    for suite in selected {
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
    let suites = selected
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

pub(super) fn find_program(name: &str, dirs: &[&str]) -> anyhow::Result<PathBuf> {
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
