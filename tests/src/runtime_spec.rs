//! A pod's container as an OCI runtime spec, the way the kubelet and containerd's CRI plugin
//! make it (containerd 1.6 `pkg/cri/server/container_create_linux.go`, kubelet's
//! `securitycontext` defaults): from containerd's default spec for the image, the pod's and
//! the container's security contexts, namespaces, mounts, environment and memory limit.
//! Whatever of a pod spec this does not implement is refused, so a manifest that starts
//! using it breaks the tests that run it instead of running differently.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::{Value, json};

use crate::error::{Result, TestbedError};

/// The kubelet's default masked paths (`securitycontext.defaultMaskedPaths`).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// The kubelet's default read-only paths (`securitycontext.defaultReadonlyPaths`).
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Where the pod's container runs, as the kubelet resolved it for this node.
pub(crate) struct ContainerPlacement {
    /// The image's root filesystem, mounted writable (runc makes mount points, then remounts).
    pub rootfs: PathBuf,
    /// The pod's network namespace (the node's for a hostNetwork pod).
    pub netns: PathBuf,
    /// The host's PID namespace, joined by hostPID pods.
    pub host_pid_ns: PathBuf,
    /// The container's cgroup, relative to the cgroup roots (the kubelet's layout).
    pub cgroups_path: String,
    /// Whether cgroup v2 is the only hierarchy: CRI then gives containers a cgroup namespace.
    pub cgroup_unified: bool,
    /// The pod's volumes and the kubelet's files, as bind mounts (`mount` objects).
    pub mounts: Vec<Value>,
    /// `NAME=value` from the image, the kubelet and the container (resolved).
    pub env: Vec<String>,
}

/// The bind mount of `source` at `destination`, read-only if asked (CRI: private propagation).
pub(crate) fn bind_mount(source: &Path, destination: &str, read_only: bool) -> Value {
    let mut options = vec!["rbind", "rprivate"];
    if read_only {
        options.push("ro");
    }
    json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

/// containerd's default spec for the image (`base`), turned into the spec of `container` in
/// `pod` placed as `placement` says, without a seccomp profile: whether it needs one is
/// `runtime_default_seccomp`'s answer, and the profile depends on its capabilities
/// (`Containerd::default_seccomp_profile`).
pub(crate) fn container_spec(
    mut spec: Value,
    pod: &PodSpec,
    container: &Container,
    placement: &ContainerPlacement,
) -> Result<Value> {
    refuse_unsupported(pod, container)?;
    let security = SecuritySettings::of(pod, container)?;
    let entrypoint: Vec<String> = match &container.command {
        Some(command) => command.clone(),
        // The image has no Cmd: containerd's process args are its entrypoint.
        None => serde_json::from_value(spec["process"]["args"].clone())
            .map_err(|e| unsupported(&format!("the default spec's process args: {e}")))?,
    };
    let args: Vec<String> = entrypoint
        .into_iter()
        .chain(container.args.iter().flatten().cloned())
        .collect();
    let process = &mut spec["process"];
    process["args"] = json!(args);
    process["env"] = json!(placement.env);
    process["user"] = json!({
        "uid": security.uid,
        "gid": security.gid,
        "additionalGids": security.additional_gids,
    });
    let capabilities = security.capabilities(&process["capabilities"]["bounding"]);
    process["capabilities"] = json!({
        "bounding": capabilities,
        "effective": capabilities,
        "permitted": capabilities,
    });
    process["noNewPrivileges"] = json!(security.no_new_privileges);
    // CRI drops containerd's default rlimits: the container inherits the runtime's.
    remove(process, "rlimits");
    if let Some(dir) = &container.working_dir {
        process["cwd"] = json!(dir);
    }
    spec["root"] = json!({"path": placement.rootfs, "readonly": security.read_only_root});
    // CRI leaves out containerd's /run tmpfs and mounts the cgroup hierarchy read-only.
    let mut mounts: Vec<Value> = spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["destination"] != "/run")
        .cloned()
        .collect();
    mounts.push(
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    );
    mounts.extend(placement.mounts.iter().cloned());
    spec["mounts"] = json!(mounts);

    let linux = &mut spec["linux"];
    linux["namespaces"] = json!(namespaces(pod, placement));
    linux["cgroupsPath"] = json!(placement.cgroups_path);
    linux["maskedPaths"] = json!(MASKED_PATHS);
    linux["readonlyPaths"] = json!(READONLY_PATHS);
    remove(linux, "seccomp");
    linux["resources"] = json!({
        "devices": linux["resources"]["devices"].clone(),
        "memory": {"limit": memory_limit(container)?},
    });
    Ok(spec)
}

/// Whether the container runs under the runtime's default seccomp profile (`RuntimeDefault`,
/// the container's setting over the pod's) or unconfined (`Unconfined`, or nothing: the
/// kubelet's default).
pub(crate) fn runtime_default_seccomp(pod: &PodSpec, container: &Container) -> Result<bool> {
    let profile = container
        .security_context
        .as_ref()
        .and_then(|c| c.seccomp_profile.as_ref())
        .or_else(|| {
            pod.security_context
                .as_ref()
                .and_then(|c| c.seccomp_profile.as_ref())
        })
        .map(|profile| profile.type_.as_str());
    match profile {
        Some("RuntimeDefault") => Ok(true),
        None | Some("Unconfined") => Ok(false),
        Some(other) => Err(unsupported(&format!("seccompProfile {other}"))),
    }
}

fn remove(value: &mut Value, key: &str) {
    if let Some(object) = value.as_object_mut() {
        object.remove(key);
    }
}

fn unsupported(what: &str) -> TestbedError {
    TestbedError::Other(format!(
        "the testbed's kubelet does not implement {what} (tests/src/runtime_spec.rs)"
    ))
}

/// Fields that would change how the container runs and that this does not implement.
fn refuse_unsupported(pod: &PodSpec, container: &Container) -> Result<()> {
    let pod_fields = [
        ("hostIPC", pod.host_ipc == Some(true)),
        (
            "shareProcessNamespace",
            pod.share_process_namespace == Some(true),
        ),
        ("hostUsers: false", pod.host_users == Some(false)),
        (
            "initContainers",
            pod.init_containers.as_ref().is_some_and(|c| !c.is_empty()),
        ),
        (
            "securityContext.sysctls",
            pod.security_context
                .as_ref()
                .is_some_and(|s| s.sysctls.is_some()),
        ),
    ];
    let context = container.security_context.as_ref();
    let container_fields = [
        ("envFrom", container.env_from.is_some()),
        ("volumeDevices", container.volume_devices.is_some()),
        (
            "securityContext.privileged",
            context.and_then(|c| c.privileged) == Some(true),
        ),
        (
            "securityContext.procMount",
            context.is_some_and(|c| c.proc_mount.is_some()),
        ),
        (
            "securityContext.seLinuxOptions",
            context.is_some_and(|c| c.se_linux_options.is_some()),
        ),
        (
            "securityContext.appArmorProfile",
            context.is_some_and(|c| c.app_armor_profile.is_some()),
        ),
    ];
    for (field, used) in pod_fields.into_iter().chain(container_fields) {
        if used {
            return Err(unsupported(field));
        }
    }
    Ok(())
}

/// The pod's and the container's security contexts, merged as the kubelet merges them.
struct SecuritySettings {
    uid: i64,
    gid: i64,
    additional_gids: Vec<i64>,
    added: Vec<String>,
    dropped: Vec<String>,
    no_new_privileges: bool,
    read_only_root: bool,
}

impl SecuritySettings {
    fn of(pod: &PodSpec, container: &Container) -> Result<Self> {
        let pod_context = pod.security_context.clone().unwrap_or_default();
        let context = container.security_context.clone().unwrap_or_default();
        // The image sets no user: root unless the pod or container says otherwise.
        let uid = context.run_as_user.or(pod_context.run_as_user).unwrap_or(0);
        let gid = context
            .run_as_group
            .or(pod_context.run_as_group)
            .unwrap_or(0);
        if context.run_as_non_root.or(pod_context.run_as_non_root) == Some(true) && uid == 0 {
            return Err(TestbedError::Other(format!(
                "container {} has runAsNonRoot and would run as root: the kubelet refuses it",
                container.name
            )));
        }
        let mut additional_gids = vec![gid];
        additional_gids.extend(pod_context.fs_group);
        additional_gids.extend(pod_context.supplemental_groups.iter().flatten());
        additional_gids.sort_unstable();
        additional_gids.dedup();
        runtime_default_seccomp(pod, container)?;
        let capabilities = context.capabilities.unwrap_or_default();
        let upper = |names: Option<Vec<String>>| -> Vec<String> {
            names
                .into_iter()
                .flatten()
                .map(|n| n.to_ascii_uppercase())
                .collect()
        };
        let added = upper(capabilities.add);
        if added.iter().any(|c| c == "ALL") {
            return Err(unsupported("capabilities.add ALL"));
        }
        Ok(Self {
            uid,
            gid,
            additional_gids,
            added,
            dropped: upper(capabilities.drop),
            // The kubelet asks for no_new_privs exactly when privilege escalation is refused.
            no_new_privileges: context.allow_privilege_escalation == Some(false),
            read_only_root: context.read_only_root_filesystem == Some(true),
        })
    }

    /// The runtime's default set (`defaults`, `CAP_`-prefixed), less what is dropped
    /// (everything for `ALL`), plus what is added.
    fn capabilities(&self, defaults: &Value) -> Vec<String> {
        let mut capabilities: Vec<String> = if self.dropped.iter().any(|c| c == "ALL") {
            Vec::new()
        } else {
            defaults
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter(|c| {
                    !self
                        .dropped
                        .iter()
                        .any(|d| c.strip_prefix("CAP_") == Some(d))
                })
                .map(str::to_owned)
                .collect()
        };
        for added in &self.added {
            let name = format!("CAP_{added}");
            if !capabilities.contains(&name) {
                capabilities.push(name);
            }
        }
        capabilities
    }
}

/// The pod's network namespace, the host's PID namespace if hostPID, new others (the host's
/// UTS namespace with the host's network, as a hostNetwork sandbox has).
fn namespaces(pod: &PodSpec, placement: &ContainerPlacement) -> Vec<Value> {
    let mut namespaces = vec![
        json!({"type": "network", "path": placement.netns}),
        json!({"type": "ipc"}),
        json!({"type": "mount"}),
    ];
    if pod.host_pid == Some(true) {
        namespaces.push(json!({"type": "pid", "path": placement.host_pid_ns}));
    } else {
        namespaces.push(json!({"type": "pid"}));
    }
    if pod.host_network != Some(true) {
        namespaces.push(json!({"type": "uts"}));
    }
    if placement.cgroup_unified {
        namespaces.push(json!({"type": "cgroup"}));
    }
    namespaces
}

/// `resources.limits.memory` in bytes (the container's memory cgroup limit).
fn memory_limit(container: &Container) -> Result<Option<i64>> {
    let Some(quantity) = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|limits| limits.get("memory"))
    else {
        return Ok(None);
    };
    let text = quantity.0.as_str();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let unit: i64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return Err(unsupported(&format!("the memory quantity {text}"))),
    };
    number
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .map(Some)
        .ok_or_else(|| unsupported(&format!("the memory quantity {text}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities, PodSecurityContext, SecurityContext};

    fn base() -> Value {
        json!({
            "process": {
                "args": ["/usr/local/bin/nodemesh"],
                "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            },
            "mounts": [{"destination": "/proc"}, {"destination": "/run"}],
            "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}, "resources": {}},
        })
    }

    fn placement() -> ContainerPlacement {
        ContainerPlacement {
            rootfs: "/rootfs".into(),
            netns: "/run/netns/node".into(),
            host_pid_ns: "/proc/1/ns/pid".into(),
            cgroups_path: "/tb/node/kubepods/pod1/c1".into(),
            cgroup_unified: false,
            mounts: vec![],
            env: vec!["PATH=/usr/local/bin".into()],
        }
    }

    fn container(context: SecurityContext) -> Container {
        Container {
            name: "agent".into(),
            args: Some(vec!["agent".into(), "--kubernetes".into()]),
            security_context: Some(context),
            ..Default::default()
        }
    }

    #[test]
    fn drop_all_leaves_exactly_the_added_capabilities_and_the_context_applies() {
        let pod = PodSpec {
            host_network: Some(true),
            host_pid: Some(true),
            ..Default::default()
        };
        let context = SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["BPF".into(), "NET_ADMIN".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        };
        let spec = container_spec(base(), &pod, &container(context), &placement()).unwrap();
        assert_eq!(
            spec["process"]["capabilities"]["effective"],
            json!(["CAP_BPF", "CAP_NET_ADMIN"])
        );
        assert_eq!(
            spec["process"]["args"],
            json!(["/usr/local/bin/nodemesh", "agent", "--kubernetes"])
        );
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert!(spec["process"].get("rlimits").is_none());
        assert_eq!(spec["root"]["readonly"], true);
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(
            !runtime_default_seccomp(&pod, &container(SecurityContext::default())).unwrap(),
            "Unconfined unless asked"
        );
        let types: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["network", "ipc", "mount", "pid"],
            "no UTS: the host's"
        );
        assert_eq!(spec["linux"]["namespaces"][3]["path"], "/proc/1/ns/pid");
    }

    #[test]
    fn a_non_root_pod_gets_its_groups_and_the_runtime_default_seccomp() {
        let pod = PodSpec {
            security_context: Some(PodSecurityContext {
                fs_group: Some(65532),
                ..Default::default()
            }),
            ..Default::default()
        };
        let context = SecurityContext {
            run_as_user: Some(65532),
            run_as_non_root: Some(true),
            seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            capabilities: Some(Capabilities {
                drop: Some(vec!["NET_RAW".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let agent = container(context);
        let spec = container_spec(base(), &pod, &agent, &placement()).unwrap();
        assert_eq!(
            spec["process"]["user"],
            json!({"uid": 65532, "gid": 0, "additionalGids": [0, 65532]})
        );
        assert_eq!(
            spec["process"]["capabilities"]["bounding"],
            json!(["CAP_CHOWN", "CAP_KILL"]),
            "the runtime's defaults less the dropped one"
        );
        assert!(
            spec["linux"].get("seccomp").is_none(),
            "the runtime's profile was made for its own capabilities, not the container's"
        );
        assert!(runtime_default_seccomp(&pod, &agent).unwrap());
        assert_eq!(spec["process"]["noNewPrivileges"], false);
    }

    #[test]
    fn what_the_kubelet_here_cannot_do_is_refused_by_name() {
        let root_but_non_root = SecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        };
        let error = container_spec(
            base(),
            &PodSpec::default(),
            &container(root_but_non_root),
            &placement(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("runAsNonRoot"), "{error}");
        let privileged = SecurityContext {
            privileged: Some(true),
            ..Default::default()
        };
        let error = container_spec(
            base(),
            &PodSpec::default(),
            &container(privileged),
            &placement(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("securityContext.privileged"),
            "{error}"
        );
    }
}
