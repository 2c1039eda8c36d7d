//! Builds the eBPF programs (agent-ebpf) for the BPF target with the pinned nightly, so one
//! `cargo build` produces an agent that embeds them. The nightly's LLVM must match
//! bpf-linker's; scripts/setup.sh installs both.

const EBPF_NIGHTLY: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
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
