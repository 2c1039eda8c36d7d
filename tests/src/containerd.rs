//! The testbed's container runtime: containerd and runc from Debian's packages, private to
//! the testbed (root, state, socket and runc's state under `<tmp>/<testbed>-containerd`, a
//! containerd namespace of the testbed's name), running images the way a node's runtime
//! runs a pod's containers. `kubelet.rs` plays the kubelet: it turns a pod spec into the
//! OCI runtime spec that `ctr run` hands to runc here.
//!
//! `ctr` (1.6, Debian 12) cannot set a container's user or exact capabilities from flags,
//! so a container runs from a full runtime spec (`ctr run --config`): containerd's own
//! default spec for the image (`ctr containers create`, read back), changed as the kubelet
//! and containerd's CRI plugin change it, over the image's root filesystem mounted from
//! containerd's snapshotter. A `RuntimeDefault` seccomp profile is containerd's own too:
//! `ctr containers create --seccomp` with the container's capabilities, which calls the
//! function the CRI plugin calls, after the capabilities are set.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    Testbed, cgroup,
    cleanup::{Tracked, lock},
    error::{IoContext, Result, TestbedError},
    exec::Placement,
    naming,
    wait::wait_until,
};

/// The testbed's containerd, reached with `ctr`. Cheap to clone: it names directories.
#[derive(Clone, Debug)]
pub struct Containerd {
    dir: PathBuf,
    namespace: String,
}

/// A container `ctr run` runs: its id, and where ctr writes its pid once it started.
#[derive(Clone, Debug)]
pub(crate) struct RunFiles {
    pub id: String,
    /// The container's pid as the host sees it.
    pub pid_file: PathBuf,
}

impl RunFiles {
    /// The container's pid, once it started.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Containerd {
    fn address(&self) -> PathBuf {
        self.dir.join("state/containerd.sock")
    }

    /// Where the testbed's kubelet keeps pods' volumes and files (`<dir>/pods/<uid>`).
    pub(crate) fn pods_dir(&self) -> PathBuf {
        self.dir.join("pods")
    }

    /// `ctr` talking to this containerd, in the testbed's namespace.
    pub fn ctr(&self) -> Command {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address")
            .arg(self.address())
            .args(["--namespace", &self.namespace]);
        ctr
    }

    /// Runs `ctr args...`; its stdout, or an error with its stderr.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let output = self
            .ctr()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .io_context(|| "running ctr (scripts/setup.sh installs containerd)".into())?;
        if !output.status.success() {
            return Err(TestbedError::Command {
                command: format!("ctr {}", args.join(" ")),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `ctr images import --base-name <repository> --digests <archive>`, as a node's
    /// operator imports it (docs/install.md): the archive's tag becomes
    /// `<repository>:<tag>` and its digest `<repository>@sha256:...`. Returns the image
    /// names containerd then holds.
    pub fn import(&self, archive: &Path, repository: &str) -> Result<Vec<String>> {
        let archive = archive.display().to_string();
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            repository,
            "--digests",
            &archive,
        ])?;
        Ok(self
            .ctr_ok(&["images", "ls", "--quiet"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// containerd's default runtime spec for `image`, with the image's entrypoint,
    /// environment and working directory applied.
    pub(crate) fn default_spec(&self, image: &str, probe_id: &str) -> Result<Value> {
        self.probe_spec(&["containers", "create", image, probe_id], probe_id)
    }

    /// containerd's default seccomp profile (`RuntimeDefault`) for a container of `image`
    /// with exactly `capabilities` (`CAP_` names): containerd allows the system calls of
    /// the capabilities a container holds (bpf() with CAP_BPF or CAP_SYS_ADMIN, setns() with
    /// CAP_SYS_ADMIN, ...), as the CRI plugin computes it for a pod's container.
    /// `runtime_defaults` are the capabilities of containerd's default spec.
    pub(crate) fn default_seccomp_profile(
        &self,
        image: &str,
        probe_id: &str,
        runtime_defaults: &[String],
        capabilities: &[String],
    ) -> Result<Value> {
        let mut args = vec!["containers", "create", "--seccomp"];
        for added in capabilities
            .iter()
            .filter(|c| !runtime_defaults.contains(c))
        {
            args.extend(["--cap-add", added.as_str()]);
        }
        for dropped in runtime_defaults
            .iter()
            .filter(|c| !capabilities.contains(c))
        {
            args.extend(["--cap-drop", dropped.as_str()]);
        }
        args.extend([image, probe_id]);
        let spec = self.probe_spec(&args, probe_id)?;
        let mut applied: Vec<String> =
            serde_json::from_value(spec["process"]["capabilities"]["bounding"].clone())
                .unwrap_or_default();
        let mut wanted = capabilities.to_vec();
        applied.sort();
        wanted.sort();
        if applied != wanted {
            return Err(TestbedError::Other(format!(
                "ctr made a container with capabilities {applied:?}, not {wanted:?}: its seccomp profile would be another container's"
            )));
        }
        match spec["linux"].get("seccomp") {
            Some(profile) if profile.is_object() => Ok(profile.clone()),
            _ => Err(TestbedError::Other(format!(
                "ctr containers create --seccomp made no seccomp profile: {spec}"
            ))),
        }
    }

    /// The spec of a container `ctr args...` creates as `probe_id`, which is then deleted.
    fn probe_spec(&self, args: &[&str], probe_id: &str) -> Result<Value> {
        self.ctr_ok(args)?;
        let info = self.ctr_ok(&["containers", "info", probe_id]);
        let deleted = self.ctr_ok(&["containers", "delete", probe_id]);
        let info: Value = serde_json::from_str(&info?)
            .map_err(|e| TestbedError::Other(format!("ctr containers info: {e}")))?;
        deleted?;
        match info.get("Spec") {
            Some(spec) if spec.is_object() => Ok(spec.clone()),
            _ => Err(TestbedError::Other(format!(
                "ctr containers info {probe_id} has no Spec: {info}"
            ))),
        }
    }

    /// Mounts a writable snapshot of `image` for container `id` (runc makes the mount points
    /// in it, then remounts it read-only if the spec says so) and returns where.
    pub(crate) fn mount_rootfs(&self, image: &str, id: &str) -> Result<PathBuf> {
        let target = self.dir.join("rootfs").join(id);
        std::fs::create_dir_all(&target).io_context(|| format!("creating {}", target.display()))?;
        let path = target.display().to_string();
        self.ctr_ok(&["images", "mount", "--rw", image, &path])?;
        Ok(target)
    }

    /// `ctr run` of container `id` from `spec` in the foreground: it forwards signals to the
    /// container and exits with it; runc writes the container's stdout and stderr to `log`.
    pub(crate) fn run_command(
        &self,
        id: &str,
        spec: &Value,
        log: &Path,
    ) -> Result<(Command, RunFiles)> {
        let specs = self.dir.join("specs");
        std::fs::create_dir_all(&specs).io_context(|| format!("creating {}", specs.display()))?;
        let spec_file = specs.join(format!("{id}.json"));
        let text = serde_json::to_vec_pretty(spec)
            .map_err(|e| TestbedError::Other(format!("serialising a runtime spec: {e}")))?;
        std::fs::write(&spec_file, text)
            .io_context(|| format!("writing {}", spec_file.display()))?;
        let pid_file = specs.join(format!("{id}.pid"));
        let mut ctr = self.ctr();
        ctr.args(["run", "--rm", "--runc-root"])
            .arg(self.dir.join("runc"))
            .arg("--log-uri")
            .arg(format!("file://{}", log.display()))
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--config")
            .arg(&spec_file)
            .arg(id)
            .stdin(Stdio::null());
        Ok((
            ctr,
            RunFiles {
                id: id.to_owned(),
                pid_file,
            },
        ))
    }

    /// Runs `args` in the running container `id` (`ctr tasks exec`, like `kubectl exec`).
    pub fn exec(&self, id: &str, args: &[&str]) -> Result<Output> {
        let exec_id = format!(
            "exec-{}",
            crate::util::container_id()?.get(..12).unwrap_or("x")
        );
        self.ctr()
            .args(["tasks", "exec", "--exec-id", &exec_id, id])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .io_context(|| format!("ctr tasks exec {id} {}", args.join(" ")))
    }

    /// Stops every container and removes them, their snapshots and root filesystem mounts,
    /// so that runc removes the cgroups it made and the shims exit cleanly. Returns errors.
    pub(crate) fn shutdown(&self) -> Vec<String> {
        let listed = |what: &str| -> Vec<String> {
            self.ctr_ok(&[what, "ls", "--quiet"])
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        };
        for task in listed("tasks") {
            let _ = self.ctr_ok(&["tasks", "kill", "--signal", "SIGKILL", &task]);
        }
        // Each `ctr run --rm` client removes its task and container once the task is gone.
        let _ = wait_until(Duration::from_secs(10), "containers to be removed", || {
            Ok(listed("containers").is_empty())
        });
        let mut errors = Vec::new();
        let mut note = |result: Result<String>| {
            if let Err(error) = result {
                errors.push(error.to_string());
            }
        };
        for task in listed("tasks") {
            note(self.ctr_ok(&["tasks", "delete", "--force", &task]));
        }
        for container in listed("containers") {
            note(self.ctr_ok(&["containers", "delete", &container]));
        }
        for mount in mounts_under(&self.dir.join("rootfs")) {
            note(self.ctr_ok(&["images", "unmount", "--rm", &mount.display().to_string()]));
        }
        errors
    }
}

/// Mount points at or below `dir` (this process's mount namespace), deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

impl Testbed {
    /// Starts the testbed's containerd (in the host's network namespace, in the testbed's
    /// cgroup `containerd`); teardown stops its containers and it. Returns once it answers.
    pub fn start_containerd(&self) -> Result<Containerd> {
        let runtime = Containerd {
            dir: naming::container_runtime_dir(&self.name),
            namespace: self.name.clone(),
        };
        let dir = &runtime.dir;
        for sub in ["root", "state", "opt"] {
            std::fs::create_dir_all(dir.join(sub))
                .io_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        // The CRI plugin is the kubelet's way in; the testbed plays the kubelet with ctr.
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.tracing\", \
             \"io.containerd.tracing.processor.v1.otlp\"]\n\
             [grpc]\n  address = {address:?}\n[debug]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
            root = dir.join("root"),
            state = dir.join("state"),
            address = runtime.address(),
            opt = dir.join("opt"),
        );
        let config_file = dir.join("config.toml");
        std::fs::write(&config_file, config)
            .io_context(|| format!("writing {}", config_file.display()))?;
        let log_path = self.log_dir.join(format!("{}-containerd.log", self.name));
        std::fs::create_dir_all(&self.log_dir)
            .io_context(|| format!("creating {}", self.log_dir.display()))?;
        let log = std::fs::File::create(&log_path)
            .io_context(|| format!("creating {}", log_path.display()))?;
        let stderr = log
            .try_clone()
            .io_context(|| format!("duplicating {}", log_path.display()))?;
        let cgroup_dir = self.cgroup2_root.join(&self.name).join("containerd");
        cgroup::create(&cgroup_dir)?;
        let mut command = Command::new("containerd");
        command
            .arg("--config")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = Placement::in_cgroup(&cgroup_dir)?.spawn(&mut command)?;
        {
            let mut res = lock(&self.shared);
            res.children.push(Tracked {
                what: "containerd".into(),
                pod: None,
                child,
            });
            res.container_runtime = Some(runtime.clone());
        }
        wait_until(Duration::from_secs(20), "containerd to answer", || {
            Ok(runtime.ctr_ok(&["version"]).is_ok())
        })
        .map_err(|error| {
            TestbedError::Other(format!(
                "{error}; its log: {}",
                crate::util::tail(&log_path, 20)
            ))
        })?;
        Ok(runtime)
    }
}
