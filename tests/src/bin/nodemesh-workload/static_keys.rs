//! `hold-static-keys`: keeps the kernel's BPF hooks switched on for the kernel-matrix VMs.
//!
//! Each cgroup BPF attach type and sk_lookup sits behind a static key: the kernel patches
//! the jump in `connect()`, `recvmsg()`, the socket lookup and so on into its code when the
//! first program of that type is attached anywhere, and back out when the last one goes.
//! The patch goes through a temporary `int3`. Every test starts and stops agents, so every
//! test made the kernel rewrite its own text while the tests' sockets ran through it. Under
//! QEMU's multi-threaded TCG (the VMs have no KVM here) a vCPU once executed a stale
//! translation of that `int3` after the patch was done, and the 6.12 guest died
//! (`Oops: int3` in `__inet_stream_connect`, docs/vm-test.md). Real CPUs do not do that.
//!
//! This mode attaches a program that returns 1 (allow, or for sk_lookup "no opinion") for
//! each hook the agent uses, to a cgroup of its own with no process in it and to a network
//! namespace of its own, so none of them ever runs; the keys then stay on and the kernel
//! never patches them during the tests. It forks into the background once every link is
//! made and holds them until the VM powers off.
//!
//! The raw `bpf(2)` system call, as in include/uapi/linux/bpf.h: aya loads programs only
//! from an object file, and a two-instruction program needs none.

use std::{
    ffi::CStr,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
};

use anyhow::Context;

#[derive(clap::Args)]
pub struct HoldStaticKeysArgs {
    /// The cgroup (v2) directory to create and attach the cgroup programs to.
    #[arg(long)]
    cgroup: PathBuf,
}

/// `enum bpf_cmd` values.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `enum bpf_prog_type` values.
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;

/// `enum bpf_attach_type` values of the hooks the agent attaches (agent/src/datapath).
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

/// The cgroup hooks: (program type, attach type).
const CGROUP_HOOKS: [(u32, u32); 9] = [
    (BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP6_SENDMSG),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_RECVMSG),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP6_RECVMSG),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_GETPEERNAME),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_GETPEERNAME),
];

/// `r0 = 1; exit`, as `struct bpf_insn` (code, registers, offset, immediate; little endian).
const RETURN_ONE: [u64; 2] = [
    0xb7 | (1 << 32), // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
    0x95,             // BPF_JMP | BPF_EXIT
];

/// The `BPF_PROG_LOAD` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_LINK_CREATE` prefix of `union bpf_attr`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

pub fn run(args: &HoldStaticKeysArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.cgroup)
        .with_context(|| format!("creating the cgroup {}", args.cgroup.display()))?;
    let cgroup = File::open(&args.cgroup)
        .with_context(|| format!("opening the cgroup {}", args.cgroup.display()))?;
    let mut links = Vec::new();
    for (prog_type, attach_type) in CGROUP_HOOKS {
        links.push(
            attach(prog_type, attach_type, &cgroup)
                .with_context(|| format!("attach type {attach_type} on the cgroup"))?,
        );
    }
    // sk_lookup's key is switched by attachments to any network namespace: a new one of
    // this process, where nothing listens.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("entering a network namespace of its own")?;
    let netns = File::open("/proc/self/ns/net").context("opening its network namespace")?;
    links.push(
        attach(BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP, &netns)
            .context("sk_lookup on its network namespace")?,
    );
    println!(
        "hold-static-keys: {} hooks held on {}",
        links.len(),
        args.cgroup.display()
    );
    // The parent exits 0 once everything is attached; the child keeps the links.
    nix::unistd::daemon(true, true).context("forking into the background")?;
    loop {
        nix::unistd::pause();
    }
}

/// Loads the return-one program for `attach_type` and links it to `target`.
fn attach(prog_type: u32, attach_type: u32, target: &File) -> io::Result<(OwnedFd, OwnedFd)> {
    let license: &CStr = c"GPL";
    let load = ProgLoadAttr {
        prog_type,
        insn_cnt: RETURN_ONE.len() as u32,
        insns: RETURN_ONE.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    let program = bpf_fd(BPF_PROG_LOAD, &load)?;
    let create = LinkCreateAttr {
        prog_fd: fd_u32(&program)?,
        target_fd: fd_u32(target)?,
        attach_type,
        flags: 0,
    };
    let link = bpf_fd(BPF_LINK_CREATE, &create)?;
    Ok((program, link))
}

fn fd_u32(fd: &impl AsRawFd) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))
}

/// A `bpf(2)` command that returns a new descriptor.
fn bpf_fd<T>(command: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised repr(C) prefix of `union bpf_attr` of the size
    // passed; the kernel reads that many bytes and treats the rest as zero. The pointers in
    // it (instructions, license) outlive the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(result).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor; we own it from here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
