//! Detaching pinned links at once, for `nodemesh datapath remove`.
//!
//! Unpinning a link drops its last reference, but the program stays attached until bpffs
//! has freed the inode (after an RCU grace period) and the link's release has run from a
//! workqueue. The `BPF_LINK_DETACH` command (5.9) detaches a cgroup or netns link
//! synchronously, whoever holds it; the link object then lingers, defunct, until its last
//! reference goes.
//!
//! aya has no call for it (its `FdLink::detach` only drops the descriptor), so this is the
//! raw `bpf(2)` system call, as in include/uapi/linux/bpf.h.

use std::{
    ffi::CString,
    io,
    os::{fd::FromRawFd, unix::ffi::OsStrExt},
    path::Path,
};

/// `enum bpf_cmd` values.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_LINK_DETACH`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches the link pinned at `path` now (it stays pinned).
pub(super) fn detach_pinned(path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("a NUL in the path"))?;
    let get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &get)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor; we own it from here.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let detach = LinkDetachAttr {
        link_fd: u32::try_from(fd).map_err(|_| io::Error::other("negative descriptor"))?,
    };
    bpf(BPF_LINK_DETACH, &detach)?;
    drop(link);
    Ok(())
}

fn bpf<T>(command: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised repr(C) prefix of `union bpf_attr` of the size
    // passed; the kernel reads that many bytes and treats the rest as zero.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}
