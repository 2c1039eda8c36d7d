//! Finding a pod's cgroup from its UID, as the kubelet lays cgroups out.
//!
//! cgroupfs driver: `kubepods/pod<uid>` (Guaranteed) or `kubepods/<qos>/pod<uid>`.
//! systemd driver: `kubepods.slice/kubepods-pod<uid_>.slice` or
//! `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`, where `uid_` is the
//! UID with `-` replaced by `_`.
//!
//! The programs attach to cgroup v2 only. On a unified host that is `--cgroup-root` itself;
//! on a hybrid host (v1 controllers, v2 mounted at `<root>/unified`) the pods are looked for
//! under `<root>/unified`, where systemd mirrors its slices. With the cgroupfs driver on a
//! hybrid host the kubelet creates v1 cgroups only, so no pod can be captured: the error
//! says so.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no kubepods or kubepods.slice under {0} or {0}/unified; is --cgroup-root the node's \
         cgroup root? (on a hybrid v1+v2 host the kubelet must use the systemd cgroup driver, \
         or pods have no cgroup v2 to capture)"
    )]
    NoPodsRoot(PathBuf),
    #[error("no cgroup for pod uid {uid} under {root} (the kubelet may not have created it yet)")]
    PodNotFound { uid: String, root: PathBuf },
    #[error("pod cgroup {0} has no processes yet")]
    NoProcesses(PathBuf),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

/// The directory under which the kubelet puts every pod cgroup: where the programs attach.
pub fn pods_root(cgroup_root: &Path) -> Result<PathBuf, CgroupError> {
    [
        "kubepods",
        "kubepods.slice",
        "unified/kubepods",
        "unified/kubepods.slice",
    ]
    .iter()
    .map(|dir| cgroup_root.join(dir))
    .find(|dir| dir.is_dir())
    .ok_or_else(|| CgroupError::NoPodsRoot(cgroup_root.to_owned()))
}

/// The pod-level cgroup directory of the pod with this UID, under either cgroup driver.
pub fn find_pod_cgroup(pods_root: &Path, uid: &str) -> Result<PathBuf, CgroupError> {
    let systemd_uid = uid.replace('-', "_");
    let mut candidates = vec![
        pods_root.join(format!("pod{uid}")),
        pods_root.join(format!("kubepods-pod{systemd_uid}.slice")),
    ];
    for qos in QOS_CLASSES {
        candidates.push(pods_root.join(qos).join(format!("pod{uid}")));
        candidates.push(
            pods_root
                .join(format!("kubepods-{qos}.slice"))
                .join(format!("kubepods-{qos}-pod{systemd_uid}.slice")),
        );
    }
    candidates
        .into_iter()
        .find(|dir| dir.is_dir())
        .ok_or_else(|| CgroupError::PodNotFound {
            uid: uid.to_owned(),
            root: pods_root.to_owned(),
        })
}

/// The cgroup v2 id of a cgroup directory: its inode number on cgroupfs.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(dir)
        .map(|meta| meta.ino())
        .map_err(|source| CgroupError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// A process of the pod: the first pid found in the pod cgroup or its container cgroups.
pub fn any_process(pod_cgroup: &Path) -> Result<u32, CgroupError> {
    first_pid(pod_cgroup)?.ok_or_else(|| CgroupError::NoProcesses(pod_cgroup.to_owned()))
}

fn first_pid(dir: &Path) -> Result<Option<u32>, CgroupError> {
    let procs = dir.join("cgroup.procs");
    match std::fs::read_to_string(&procs) {
        Ok(text) => {
            if let Some(pid) = text
                .lines()
                .find_map(|line| line.trim().parse::<u32>().ok())
            {
                return Ok(Some(pid));
            }
        }
        // The cgroup disappeared between listing and reading: the pod is going away.
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CgroupError::Io {
                path: procs,
                source,
            });
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| CgroupError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(pid) = first_pid(&entry.path())?
        {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "4f0c9a1e-7b1d-4c59-9a57-0d8a3f1b2c3d";

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for dir in dirs {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        root
    }

    #[test]
    fn finds_cgroupfs_layouts() {
        for layout in [
            format!("kubepods/besteffort/pod{UID}/c0ffee"),
            format!("kubepods/burstable/pod{UID}/c0ffee"),
            format!("kubepods/pod{UID}/c0ffee"),
        ] {
            let root = tree(&[&layout]);
            let pods = pods_root(root.path()).unwrap();
            assert_eq!(pods, root.path().join("kubepods"));
            let found = find_pod_cgroup(&pods, UID).unwrap();
            assert_eq!(found, root.path().join(layout.rsplit_once('/').unwrap().0));
        }
    }

    #[test]
    fn finds_the_unified_hierarchy_of_a_hybrid_host() {
        let uid_ = UID.replace('-', "_");
        let layout = format!(
            "unified/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice"
        );
        // The v1 controller hierarchies sit next to `unified` and are not used.
        let root = tree(&["cpu/kubepods.slice", &layout]);
        let pods = pods_root(root.path()).unwrap();
        assert_eq!(pods, root.path().join("unified/kubepods.slice"));
        assert_eq!(
            find_pod_cgroup(&pods, UID).unwrap(),
            root.path().join(&layout)
        );
    }

    #[test]
    fn finds_systemd_layouts() {
        let uid_ = UID.replace('-', "_");
        for layout in [
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"),
            format!("kubepods.slice/kubepods-pod{uid_}.slice"),
        ] {
            let root = tree(&[&layout]);
            let pods = pods_root(root.path()).unwrap();
            assert_eq!(
                find_pod_cgroup(&pods, UID).unwrap(),
                root.path().join(&layout)
            );
        }
    }

    #[test]
    fn reports_missing_pods_and_roots() {
        let root = tree(&["kubepods/besteffort/podother"]);
        let pods = pods_root(root.path()).unwrap();
        let err = find_pod_cgroup(&pods, UID).unwrap_err();
        assert!(err.to_string().contains(UID), "{err}");
        let empty = tree(&[]);
        assert!(matches!(
            pods_root(empty.path()),
            Err(CgroupError::NoPodsRoot(_))
        ));
    }

    #[test]
    fn finds_a_process_in_a_container_cgroup() {
        let root = tree(&["pod/container-a", "pod/container-b"]);
        let pod = root.path().join("pod");
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        std::fs::write(pod.join("container-a/cgroup.procs"), "").unwrap();
        std::fs::write(pod.join("container-b/cgroup.procs"), "4242\n").unwrap();
        assert_eq!(any_process(&pod).unwrap(), 4242);
        std::fs::write(pod.join("container-b/cgroup.procs"), "").unwrap();
        assert!(matches!(
            any_process(&pod),
            Err(CgroupError::NoProcesses(_))
        ));
    }
}
