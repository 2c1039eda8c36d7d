//! `cargo xtask fuzz`: runs every cargo-fuzz target in fuzz/ for a while on its committed
//! corpus (CI runs it briefly as a smoke test; a campaign runs each for ≥ 10 minutes).

use std::process::Command;

use anyhow::{Context, bail};

/// The nightly that scripts/setup.sh installs (also the eBPF build's).
const NIGHTLY: &str = "nightly-2026-07-01";
pub const TARGETS: &[&str] = &[
    "protocol_detection",
    "connect_authority",
    "spiffe_id",
    "traceparent",
    "http_route",
    "http_path",
    "authorization_policy",
    "cluster_state",
    "map_keys",
    "dns_query",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Only this target (default: all).
    #[arg(long)]
    target: Option<String>,
    /// Build without optimisation: much quicker to build, slower to run (CI's smoke run).
    #[arg(long)]
    dev: bool,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let targets: Vec<&str> = match &args.target {
        Some(one) if TARGETS.contains(&one.as_str()) => vec![one.as_str()],
        Some(other) => bail!("no fuzz target {other:?}; there are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    for target in targets {
        let corpus = root.join("fuzz/corpus").join(target);
        println!("fuzz {target}: {} s on {}", args.seconds, corpus.display());
        let status = Command::new("cargo")
            .current_dir(&root)
            .arg(format!("+{NIGHTLY}"))
            .args(["fuzz", "run", target])
            .args(args.dev.then_some("--dev"))
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .status()
            .context("running cargo fuzz (scripts/setup.sh installs cargo-fuzz)")?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed: {status} (the crashing input is in fuzz/artifacts/{target}/)"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_run_and_has_a_seed_corpus() {
        let root = crate::workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        let declared: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|name| *name != "nodemesh-fuzz")
            .collect();
        assert_eq!(
            declared, TARGETS,
            "fuzz/Cargo.toml and TARGETS list the same targets"
        );
        for target in TARGETS {
            let corpus = root.join("fuzz/corpus").join(target);
            let seeds = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
            assert!(seeds > 0, "{} has no seeds", corpus.display());
            assert!(
                root.join(format!("fuzz/fuzz_targets/{target}.rs"))
                    .is_file()
            );
        }
    }
}
