//! `cargo xtask <task>`: the project's entry points (see README.md).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use nodemesh_testbed::{ClusterMode, Testbed, TestbedConfig, TopologySpec};

mod bench;
mod demo;
mod deploy;
mod fuzz;
mod image;
mod plot;
mod scale;
mod vm;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build a 2-node testbed, run real traffic through the mesh, print what happened.
    Demo(demo::DemoArgs),
    /// Run every test, including the privileged kernel tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Measure the datapath against direct traffic and print a markdown report.
    Bench(bench::BenchArgs),
    /// Measure one agent's memory, sync time and churn CPU as the cluster grows (real API
    /// server; needs root).
    Scale(scale::ScaleArgs),
    /// Run the kernel test suite on a Debian kernel (6.1, 6.12) under qemu/KVM, or `host`.
    VmTest(vm::VmTestArgs),
    /// Render the Helm chart into deploy/manifests, or check the manifests.
    #[command(subcommand)]
    Deploy(deploy::DeployTask),
    /// Runs the cargo-fuzz targets in fuzz/ on their corpus.
    Fuzz(fuzz::FuzzArgs),
    /// Build the OCI image (static binary, reproducible) as an archive under target/oci,
    /// with a values file that pins its digest in the chart.
    Image(image::ImageArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(args) => demo::run(&args),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Bench(args) => bench::run(&args),
        Task::Scale(args) => scale::run(&args),
        Task::VmTest(args) => vm::run(&args),
        Task::Deploy(task) => deploy::run(&task),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Image(args) => image::run(&args),
    }
}

/// Builds the binaries, removes what an interrupted earlier run left, builds the standard
/// testbed with a CA pod, runs `work` on it and tears it down whatever happened (also on
/// Ctrl-C), saying whether anything was left behind.
pub fn with_testbed<T>(
    prefix: &str,
    release: bool,
    cluster: ClusterMode,
    work: impl FnOnce(&mut Testbed) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    with_testbed_of(prefix, build_binaries(release)?, cluster, work)
}

/// `with_testbed` with binaries already built: `nodemesh`'s and the workload's.
pub fn with_testbed_of<T>(
    prefix: &str,
    (nodemesh_bin, workload_bin): (PathBuf, PathBuf),
    cluster: ClusterMode,
    work: impl FnOnce(&mut Testbed) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    for stale in nodemesh_testbed::sweep_stale(prefix) {
        println!("removed leftover of an earlier run: {stale}");
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the testbed down");
        nodemesh_testbed::teardown_all_registered();
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let config = TestbedConfig {
        prefix: prefix.into(),
        nodemesh_bin,
        workload_bin,
        log_dir: None,
        cluster,
        chart_values: Vec::new(),
        worker_threads: Vec::new(),
    };
    let mut tb = Testbed::create(config, TopologySpec::standard_with_ca())
        .context("building the testbed")?;
    let result = work(&mut tb);
    match tb.teardown() {
        Ok(report) if report.leftovers.is_empty() => println!("\nteardown: nothing left behind"),
        Ok(report) => println!("\nteardown left behind: {:?}", report.leftovers),
        Err(error) => println!("\nteardown failed: {error}"),
    }
    result
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds the agent and the test workload; returns their paths.
pub fn build_binaries(release: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    build_binaries_with(release, AgentBuild::default())
}

/// How the agent is built beyond its defaults.
#[derive(Clone, Copy, Default)]
pub struct AgentBuild {
    /// glibc's malloc instead of jemalloc (heaptrack sees only glibc's).
    pub system_allocator: bool,
    /// The feature `count-allocations`: `/allocations` on the admin API (the bench's).
    pub count_allocations: bool,
}

/// `build_binaries`, the agent built as `agent` says.
pub fn build_binaries_with(release: bool, agent: AgentBuild) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(workspace_root()).args([
        "build",
        "--package",
        "nodemesh",
        "--package",
        "nodemesh-testbed",
        "--bins",
    ]);
    if release {
        cargo.arg("--release");
    }
    if agent.system_allocator {
        cargo.arg("--no-default-features");
    }
    if agent.count_allocations {
        cargo.args(["--features", "nodemesh/count-allocations"]);
    }
    run(&mut cargo)?;
    let dir = target_dir().join(if release { "release" } else { "debug" });
    Ok((dir.join("nodemesh"), dir.join("nodemesh-workload")))
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the kernel tests load eBPF programs and create network namespaces: run as root");
    }
    let (nodemesh, workload) = build_binaries(false)?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("NODEMESH_BIN", &nodemesh)
        .env("NODEMESH_WORKLOAD_BIN", &workload);
    if !extra.is_empty() {
        cargo.arg("--").args(extra);
    }
    run(&mut cargo)
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
