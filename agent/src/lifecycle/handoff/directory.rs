//! The handoff socket's directory: the agent's own (owned by its user, mode 0700, not a
//! symbolic link), so the socket in it is reachable only by processes that mount it and
//! run as the agent's user. In the chart it is a hostPath only the agent mounts.

use std::path::{Path, PathBuf};

use nix::{
    errno::Errno,
    fcntl::{OFlag, open},
    sys::stat::{Mode, SFlag, fchmod, fstat, lstat},
    unistd::{Uid, mkdir},
};

/// The only permissions the directory may keep.
const OWNER_ONLY: u32 = 0o700;
/// Bits that would let another user put something in the directory.
const WRITABLE_BY_OTHERS: u32 = 0o022;

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("handoff directory {path}: {action}: {errno}")]
    Io {
        path: PathBuf,
        action: &'static str,
        errno: Errno,
    },
    #[error("handoff directory {path} is a symbolic link; refusing it (use a real directory)")]
    Symlink { path: PathBuf },
    #[error("handoff directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "handoff directory {path} belongs to uid {owner}, not to the agent's uid {ours}; refusing it"
    )]
    ForeignOwner {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error(
        "handoff directory {path} is writable by its group or others (mode {mode:o}): something else may have been put there; refusing it (make it 0700)"
    )]
    WritableByOthers { path: PathBuf, mode: u32 },
}

/// What to do with an existing directory of this owner and mode.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Readable or searchable by others, writable by nobody else (a hostPath the kubelet
    /// created with `DirectoryOrCreate` is 0755): nothing else can be in it, so 0700 suffices.
    Tighten,
    RefuseForeignOwner,
    RefuseWritable,
}

fn verdict(owner: u32, mode: u32, ours: u32) -> Verdict {
    if owner != ours {
        Verdict::RefuseForeignOwner
    } else if mode & WRITABLE_BY_OTHERS != 0 {
        Verdict::RefuseWritable
    } else if mode & 0o7777 != OWNER_ONLY {
        Verdict::Tighten
    } else {
        Verdict::Keep
    }
}

/// Creates `dir` (mode 0700) if it does not exist, and otherwise checks it is the agent's
/// own: refused if it is a symbolic link, not a directory, another user's or writable by
/// others; a mode wider than 0700 that lets nobody else write is narrowed to 0700.
pub fn secure(dir: &Path) -> Result<(), DirectoryError> {
    let io = |action, errno| DirectoryError::Io {
        path: dir.to_owned(),
        action,
        errno,
    };
    match mkdir(dir, Mode::S_IRWXU) {
        Ok(()) => tracing::info!(dir = %dir.display(), "created the handoff directory"),
        Err(Errno::EEXIST) => {}
        Err(errno) => return Err(io("creating", errno)),
    }
    // Checked through a descriptor of the directory itself: a path swapped meanwhile (for a
    // link) fails here instead of being followed.
    let fd = match open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // A link is not followed: ELOOP, or ENOTDIR (O_DIRECTORY sees the link itself).
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let link = lstat(dir).is_ok_and(|stat| {
                SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFLNK
            });
            let path = dir.to_owned();
            return Err(if link {
                DirectoryError::Symlink { path }
            } else {
                DirectoryError::NotADirectory { path }
            });
        }
        Err(errno) => return Err(io("opening", errno)),
    };
    let stat = fstat(&fd).map_err(|errno| io("reading its owner and mode", errno))?;
    let ours = Uid::effective().as_raw();
    let mode = stat.st_mode & 0o7777;
    match verdict(stat.st_uid, mode, ours) {
        Verdict::Keep => Ok(()),
        Verdict::Tighten => {
            fchmod(&fd, Mode::S_IRWXU).map_err(|errno| io("setting mode 0700", errno))?;
            tracing::info!(dir = %dir.display(), from = format!("{mode:o}"), "narrowed the handoff directory's mode to 0700");
            Ok(())
        }
        Verdict::RefuseForeignOwner => Err(DirectoryError::ForeignOwner {
            path: dir.to_owned(),
            owner: stat.st_uid,
            ours,
        }),
        Verdict::RefuseWritable => Err(DirectoryError::WritableByOthers {
            path: dir.to_owned(),
            mode,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn only_the_agents_own_directory_that_nobody_else_can_write_is_used() {
        assert_eq!(verdict(0, 0o700, 0), Verdict::Keep);
        assert_eq!(verdict(0, 0o755, 0), Verdict::Tighten);
        assert_eq!(verdict(0, 0o750, 0), Verdict::Tighten);
        assert_eq!(verdict(0, 0o1700, 0), Verdict::Tighten);
        assert_eq!(verdict(0, 0o770, 0), Verdict::RefuseWritable);
        assert_eq!(verdict(0, 0o1777, 0), Verdict::RefuseWritable);
        assert_eq!(verdict(0, 0o702, 0), Verdict::RefuseWritable);
        assert_eq!(verdict(1000, 0o700, 0), Verdict::RefuseForeignOwner);
    }

    #[test]
    fn a_missing_directory_is_created_owner_only_and_a_kubelet_made_one_is_narrowed() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let dir = scratch.path().join("nodemesh");
        secure(&dir).expect("created");
        assert_eq!(mode_of(&dir), 0o700);
        secure(&dir).expect("kept");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        secure(&dir).expect("narrowed");
        assert_eq!(mode_of(&dir), 0o700);
    }

    #[test]
    fn links_files_and_directories_others_can_write_are_refused() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let real = scratch.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = scratch.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(
            matches!(secure(&link), Err(DirectoryError::Symlink { .. })),
            "{:?}",
            secure(&link)
        );

        let file = scratch.path().join("file");
        std::fs::write(&file, b"").expect("file");
        assert!(matches!(
            secure(&file),
            Err(DirectoryError::NotADirectory { .. })
        ));

        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            secure(&real),
            Err(DirectoryError::WritableByOthers { mode: 0o777, .. })
        ));
        assert_eq!(mode_of(&real), 0o777, "left as it was");
    }
}
