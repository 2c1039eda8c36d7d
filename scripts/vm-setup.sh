#!/usr/bin/env bash
# Idempotent set-up for `cargo xtask vm-test` (docs/vm-test.md) on Debian 12, run as root:
# qemu (KVM), busybox-static and cpio for the initramfs, and the Debian kernels the datapath is
# proven on: 6.1 (bookworm's own kernel, the documented floor) and 6.12 (bookworm-security
# carries it as linux-image-6.12-amd64; bookworm-backports is enabled only if it does not).
# The kernels are installed like any Debian kernel (/boot/vmlinuz-*, /lib/modules/*); nothing
# boots them except qemu.
set -euo pipefail

log() { printf '[vm-setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "run as root (it installs packages)"
  exit 1
fi
if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
  log "warning: written for Debian 12 (bookworm); package names may differ here"
fi

export DEBIAN_FRONTEND=noninteractive
updated=no
apt_update() {
  if [ "$updated" = no ]; then
    log "apt-get update"
    apt-get update -qq
    updated=yes
  fi
}
# (Output captured first: `grep -q` closing a pipe early would fail the pipeline under pipefail.)
installed() {
  local status
  status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
  [ "$status" = "install ok installed" ]
}
# Has apt a candidate version for this package?
available() {
  local policy
  policy=$(apt-cache policy "$1" 2>/dev/null || true)
  [[ "$policy" =~ Candidate:\ [^\(] ]]
}

# 6.1: the meta-package of bookworm's default kernel; 6.12: its meta-package.
KERNEL_61=linux-image-amd64
KERNEL_612=linux-image-6.12-amd64
TOOLS=(qemu-system-x86 busybox-static xz-utils)

need=()
for pkg in "${TOOLS[@]}" "$KERNEL_61" "$KERNEL_612"; do
  installed "$pkg" || need+=("$pkg")
done
if ((${#need[@]} == 0)); then
  log "ready (everything already installed)"
else
  apt_update
  if ! installed "$KERNEL_612" && ! available "$KERNEL_612"; then
    list=/etc/apt/sources.list.d/bookworm-backports.list
    log "$KERNEL_612 is not available: enabling bookworm-backports ($list)"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
    updated=no
    apt_update
    if ! available "$KERNEL_612"; then
      log "$KERNEL_612 is still not available; check the apt sources (apt-cache policy $KERNEL_612)"
      exit 1
    fi
  fi
  # Without a bootloader (a CI machine) these kernels are never booted natively: skip the
  # initramfs Debian's kernel hook builds for each (~3 minutes on 2 cores); qemu boots the
  # xtask's own initramfs. With grub or systemd-boot present, install as usual.
  if ! installed grub-common && ! installed systemd-boot; then
    export INITRD=No
  fi
  log "apt-get install ${need[*]} (kernel packages are ~70 and ~110 MB)"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -e /dev/kvm ]; then
  log "warning: /dev/kvm is missing; vm-test needs KVM (nested virtualisation on a VM host)"
fi
for series in 6.1 6.12; do
  found=$(ls /boot/vmlinuz-"$series".* 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$found" ]; then
    log "no /boot/vmlinuz-$series.* after installing; check dpkg -l 'linux-image-*'"
    exit 1
  fi
  log "kernel $series: $found"
done
