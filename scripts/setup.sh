#!/usr/bin/env bash
# Idempotent set-up for building and testing nodemesh on a fresh Debian 12 machine
# (kernel >= 6.1 with BTF, run as root). Skips whatever is already present.
# The recipe and its pinned versions are explained in docs/development.md.
set -euo pipefail

STABLE=1.99.0
NIGHTLY=nightly-2026-07-01   # its LLVM (22) must match bpf-linker's
BPF_LINKER_VERSION=0.13
LLVM=22

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
# musl-tools: the image's static binary (aws-lc's C for musl); umoci, skopeo: the OCI image;
# containerd, runc: the tests run the image as a node's runtime does (`cargo xtask image`).
# heaptrack, zstd: `cargo xtask bench --heap-profile` (docs/benchmarks.md).
# bind9-dnsutils (dig), dnsmasq-base: the DNS tests and bench; python3: fetching helm and kubectl.
for pkg in llvm-${LLVM}-dev libpolly-${LLVM}-dev zlib1g-dev libzstd-dev iproute2 bpftool curl \
           tcpdump procps psmisc socat nghttp2-client tmux heaptrack zstd \
           librsvg2-bin fonts-dejavu-core \
           musl-tools umoci skopeo containerd runc \
           bind9-dnsutils dnsmasq-base python3; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

have_toolchain() { rustup toolchain list | grep -q "^$1"; }
if ! have_toolchain "$STABLE"; then
  log "rustup toolchain install $STABLE"
  rustup toolchain install "$STABLE" --profile minimal -c clippy,rustfmt
fi
if ! have_toolchain "$NIGHTLY"; then
  log "rustup toolchain install $NIGHTLY"
  rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src
fi
# The image's binary is static: built for musl.
MUSL_TARGET=x86_64-unknown-linux-musl
if ! rustup target list --installed --toolchain "$STABLE" | grep -qx "$MUSL_TARGET"; then
  log "rustup target add $MUSL_TARGET (toolchain $STABLE)"
  rustup target add --toolchain "$STABLE" "$MUSL_TARGET"
fi

if ! command -v bpf-linker >/dev/null || ! bpf-linker --version | grep -q "^bpf-linker ${BPF_LINKER_VERSION}"; then
  log "cargo install bpf-linker ${BPF_LINKER_VERSION} (LLVM ${LLVM}; takes ~5 minutes)"
  env LLVM_PREFIX=/usr/lib/llvm-${LLVM} "LLVM_SYS_${LLVM}1_PREFIX=/usr/lib/llvm-${LLVM}" \
    cargo +"$STABLE" install --locked bpf-linker --version "~${BPF_LINKER_VERSION}" \
      --no-default-features --features llvm-${LLVM}
fi

# cargo-fuzz for the targets in fuzz/ (`cargo xtask fuzz`).
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "${CARGO_FUZZ_VERSION}"; then
  log "cargo install cargo-fuzz ${CARGO_FUZZ_VERSION} (takes ~2 minutes)"
  cargo +"$STABLE" install --locked cargo-fuzz --version "${CARGO_FUZZ_VERSION}"
fi

# Offline validation of deploy/ against the Kubernetes JSON schemas it ships (PyPI).
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! command -v kubernetes-validate >/dev/null \
   || ! kubernetes-validate --version 2>/dev/null | grep -q "${KUBERNETES_VALIDATE_VERSION}"; then
  log "pip install kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
  python3 -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mount bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

cgroup2_root=""
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
  cgroup2_root=/sys/fs/cgroup
elif mountpoint -q /sys/fs/cgroup/unified; then
  cgroup2_root=/sys/fs/cgroup/unified
else
  log "no cgroup v2 hierarchy mounted; mounting at /sys/fs/cgroup/unified"
  mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified
fi
# The real components the tests run beside the agents (kube-apiserver, etcd, Prometheus, an
# OpenTelemetry Collector, the Gateway API CRDs, helm, kubectl): built once per machine.
"$(dirname "$0")/testenv.sh"

log "ready (cgroup v2 at ${cgroup2_root:-/sys/fs/cgroup/unified})"
