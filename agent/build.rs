//! Builds the eBPF programs (agent-ebpf) for the BPF target with the pinned nightly, so one
//! `cargo build` produces an agent that embeds them. The nightly's LLVM must match
//! bpf-linker's; scripts/setup.sh installs both. Also records the git revision that
//! `nodemesh --version` prints.

use std::{path::Path, process::Command};

const EBPF_NIGHTLY: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-env=NODEMESH_REVISION={}", git_revision());
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    println!("cargo::rerun-if-changed={root_dir}/../agent-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nodemesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_NIGHTLY),
    )
}

/// The commit being built: `NODEMESH_REVISION` if set (a build outside a git checkout),
/// else `git rev-parse HEAD`, else `unknown`. Reruns when HEAD moves.
fn git_revision() -> String {
    println!("cargo::rerun-if-env-changed=NODEMESH_REVISION");
    if let Ok(revision) = std::env::var("NODEMESH_REVISION") {
        return revision;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| text.trim().to_owned())
    };
    let Some(revision) = git(&["rev-parse", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // HEAD names the branch, the branch's ref (loose or packed) names the commit.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            if path.exists() {
                println!("cargo::rerun-if-changed={}", path.display());
            }
        }
    }
    revision
}
