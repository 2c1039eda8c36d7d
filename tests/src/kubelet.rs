//! The kubelet's part for pods that run from the image: the pod's volumes written out
//! (ConfigMaps and Secrets read from the API server, projected tokens from the TokenRequest
//! API, the ServiceAccount's API credentials, hostPaths mapped to the testbed node's
//! directories), its environment resolved and `$(VAR)` references in its command and args
//! expanded (`expansion.rs`), `/etc/hosts` written, and its container started through the
//! testbed's containerd from the runtime spec `runtime_spec.rs` makes, under containerd's
//! default seccomp profile for its capabilities when it asks for `RuntimeDefault`.
//!
//! The pod specs come from the chart's rendered manifests (`deploy/manifests/nodemesh.yaml`),
//! so what runs here is what the manifests ask for, and nothing else.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Container, PodSpec, Volume},
};
use serde_json::{Value, json};

use crate::{
    Testbed, api_cluster, cgroup,
    containerd::{Containerd, RunFiles},
    control_plane::{API_SERVER_IP, API_SERVER_PORT},
    error::{IoContext, Result, TestbedError},
    expansion,
    runtime_spec::{self, ContainerPlacement, bind_mount},
    util,
};

/// Where the kubelet mounts a pod's ServiceAccount credentials (in-cluster config).
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The chart's DaemonSet and Deployment pod templates, read from its rendered manifests.
#[derive(Clone, Debug)]
pub struct ChartPods {
    /// The agent DaemonSet's pod spec.
    pub agent: PodSpec,
    /// The CA Deployment's pod spec.
    pub ca: PodSpec,
}

impl ChartPods {
    /// Reads `deploy/manifests/nodemesh.yaml` of this workspace.
    pub fn from_workspace() -> Result<ChartPods> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/nodemesh.yaml");
        ChartPods::read(&path)
    }

    /// Reads the agent DaemonSet and the CA Deployment from a multi-document manifest file.
    pub fn read(path: &Path) -> Result<ChartPods> {
        let text =
            std::fs::read_to_string(path).io_context(|| format!("reading {}", path.display()))?;
        let yaml_error = |source: serde_yaml::Error| TestbedError::Yaml {
            what: path.display().to_string(),
            source,
        };
        let (mut agent, mut ca) = (None, None);
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).map_err(yaml_error)?;
            let parse_error =
                |e: serde_json::Error| TestbedError::Other(format!("{}: {e}", path.display()));
            match (value["kind"].as_str(), value["metadata"]["name"].as_str()) {
                (Some("DaemonSet"), Some(api_cluster::AGENT_DAEMONSET)) => {
                    let daemon_set: DaemonSet =
                        serde_json::from_value(value).map_err(parse_error)?;
                    agent = daemon_set.spec.template.spec;
                }
                (Some("Deployment"), Some("nodemesh-ca")) => {
                    let deployment: Deployment =
                        serde_json::from_value(value).map_err(parse_error)?;
                    ca = deployment.spec.template.spec;
                }
                _ => {}
            }
        }
        let missing = |what: &str| {
            TestbedError::Other(format!("{} has no {what} pod template", path.display()))
        };
        Ok(ChartPods {
            agent: agent.ok_or_else(|| missing("agent DaemonSet"))?,
            ca: ca.ok_or_else(|| missing("CA Deployment"))?,
        })
    }
}

/// A pod as its node's kubelet sees it: identity, spec and where the testbed put it.
pub(crate) struct KubeletPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub spec: &'a PodSpec,
    /// The pod's network namespace: the node's for a hostNetwork pod.
    pub netns: PathBuf,
    /// The node's address (`status.hostIP`).
    pub host_ip: IpAddr,
    /// The pod's address (`status.podIP`): the node's for a hostNetwork pod.
    pub pod_ip: IpAddr,
    /// The pod's cgroup directory (the kubelet's layout); its containers' are below.
    pub cgroup: PathBuf,
    /// The node's paths that hostPath volumes may name, and the testbed's directories for them.
    pub host_paths: BTreeMap<&'static str, PathBuf>,
    /// `/etc/hosts` entries: the names this pod resolves (the testbed has no cluster DNS).
    pub hosts: Vec<(String, IpAddr)>,
}

impl Testbed {
    /// `ctr run` of `container` of `pod` from `image` (the command to spawn, and where the
    /// container's pid will be): volumes written, runtime spec made, root filesystem mounted.
    pub(crate) fn container_command(
        &self,
        runtime: &Containerd,
        pod: &KubeletPod<'_>,
        container: &str,
        image: &str,
        log: &Path,
    ) -> Result<(Command, RunFiles)> {
        let spec = pod.spec;
        let container = spec
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| {
                TestbedError::Other(format!(
                    "pod {}/{} has no container {container}",
                    pod.namespace, pod.name
                ))
            })?;
        let id = util::container_id()?;
        let pod_dir = runtime_dir_of(runtime, pod.uid);
        std::fs::create_dir_all(&pod_dir)
            .io_context(|| format!("creating {}", pod_dir.display()))?;
        let mut mounts = self.volume_mounts(pod, container, &pod_dir)?;
        let hosts = pod_dir.join("etc-hosts");
        let mut text = "127.0.0.1\tlocalhost\n::1\tlocalhost\n".to_owned();
        for (name, ip) in &pod.hosts {
            text.push_str(&format!("{ip}\t{name}\n"));
        }
        std::fs::write(&hosts, text).io_context(|| format!("writing {}", hosts.display()))?;
        chmod(&hosts, 0o644)?;
        mounts.push(bind_mount(&hosts, "/etc/hosts", false));
        let base = runtime.default_spec(image, &format!("{id}-probe"))?;
        let runtime_capabilities: Vec<String> = serde_json::from_value(
            base["process"]["capabilities"]["bounding"].clone(),
        )
        .map_err(|e| TestbedError::Other(format!("the default spec's capabilities: {e}")))?;
        let mut env: Vec<String> = base["process"]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let container_env = container_env(pod, container)?;
        env.extend(
            container_env
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        );
        let container = &expand_command_and_args(container, &container_env);
        let cgroup_dir = pod.cgroup.join(&id);
        let placement = ContainerPlacement {
            rootfs: runtime.mount_rootfs(image, &id)?,
            netns: pod.netns.clone(),
            host_pid_ns: PathBuf::from(format!("/proc/{}/ns/pid", std::process::id())),
            cgroups_path: Path::new("/")
                .join(cgroup_dir.strip_prefix(&self.cgroup2_root).map_err(|_| {
                    TestbedError::Other(format!("{} is not a cgroup", cgroup_dir.display()))
                })?)
                .display()
                .to_string(),
            cgroup_unified: self.cgroup2_root == Path::new("/sys/fs/cgroup"),
            mounts,
            env,
        };
        let mut spec = runtime_spec::container_spec(base, spec, container, &placement)?;
        if runtime_spec::runtime_default_seccomp(pod.spec, container)? {
            // As the CRI plugin does: the default profile computed for the container's
            // capabilities (the added ones allow their system calls), not the runtime's.
            let capabilities: Vec<String> =
                serde_json::from_value(spec["process"]["capabilities"]["bounding"].clone())
                    .map_err(|e| TestbedError::Other(format!("the spec's capabilities: {e}")))?;
            spec["linux"]["seccomp"] = runtime.default_seccomp_profile(
                image,
                &format!("{id}-seccomp"),
                &runtime_capabilities,
                &capabilities,
            )?;
        }
        runtime.run_command(&id, &spec, log)
    }

    /// Every volume the container mounts, written out or mapped, as bind mounts; plus the
    /// ServiceAccount's API credentials unless the pod opts out.
    fn volume_mounts(
        &self,
        pod: &KubeletPod<'_>,
        container: &Container,
        pod_dir: &Path,
    ) -> Result<Vec<Value>> {
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            if mount.sub_path.is_some() || mount.mount_propagation.is_some() {
                return Err(TestbedError::Other(format!(
                    "volume mount {} uses subPath or mountPropagation, which the testbed's kubelet does not implement",
                    mount.name
                )));
            }
            let volume = pod
                .spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| {
                    TestbedError::Other(format!("volume mount {} names no volume", mount.name))
                })?;
            let source = self.volume_source(pod, volume, pod_dir)?;
            mounts.push(bind_mount(
                &source,
                &mount.mount_path,
                mount.read_only == Some(true),
            ));
        }
        if pod.spec.automount_service_account_token != Some(false) {
            let dir = pod_dir.join("volumes/kube-api-access");
            let api = self.api()?;
            let files = BTreeMap::from([
                ("token".to_owned(), self.pod_token(pod, &[], pod_dir)?),
                ("ca.crt".to_owned(), read(&api.ca_cert())?),
                ("namespace".to_owned(), pod.namespace.as_bytes().to_vec()),
            ]);
            write_volume(&dir, &files, 0o644, pod.spec)?;
            mounts.push(bind_mount(&dir, SERVICE_ACCOUNT_DIR, true));
        }
        Ok(mounts)
    }

    /// The directory a volume's mount binds: a hostPath's counterpart, or the files of a
    /// ConfigMap, Secret or projected token written out with the volume's modes.
    fn volume_source(
        &self,
        pod: &KubeletPod<'_>,
        volume: &Volume,
        pod_dir: &Path,
    ) -> Result<PathBuf> {
        if let Some(host_path) = &volume.host_path {
            let dir = pod.host_paths.get(host_path.path.as_str()).ok_or_else(|| {
                TestbedError::Other(format!(
                    "volume {} is hostPath {}, which has no counterpart on testbed node {}",
                    volume.name, host_path.path, pod.node
                ))
            })?;
            match host_path.type_.as_deref() {
                Some("Directory") if !dir.is_dir() => {
                    return Err(TestbedError::Other(format!(
                        "hostPath {} (here {}) is not a directory",
                        host_path.path,
                        dir.display()
                    )));
                }
                // The kubelet makes it with mode 0755 (owned by its own user, root).
                Some("DirectoryOrCreate") if !dir.exists() => {
                    std::fs::create_dir(dir)
                        .io_context(|| format!("creating {}", dir.display()))?;
                    chmod(dir, 0o755)?;
                }
                Some("Directory" | "DirectoryOrCreate") => {}
                other => {
                    return Err(TestbedError::Other(format!(
                        "hostPath {} has type {other:?}, which the testbed's kubelet does not implement",
                        host_path.path
                    )));
                }
            }
            return Ok(dir.clone());
        }
        let dir = pod_dir.join("volumes").join(&volume.name);
        let api = self.api()?;
        let (files, default_mode) = if let Some(config_map) = &volume.config_map {
            let object = api.get(&json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": config_map.name, "namespace": pod.namespace}}))?;
            let data = object
                .map(|o| o.data["data"].clone())
                .unwrap_or(Value::Null);
            let files = data_files(&data, &format!("ConfigMap {}", config_map.name), false)?;
            (files, config_map.default_mode)
        } else if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            let object = api.get(&json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": pod.namespace}}))?;
            let data = object
                .map(|o| o.data["data"].clone())
                .unwrap_or(Value::Null);
            let files = data_files(&data, &format!("Secret {name}"), true)?;
            (files, secret.default_mode)
        } else if let Some(projected) = &volume.projected {
            let mut files = BTreeMap::new();
            for source in projected.sources.iter().flatten() {
                let token = source.service_account_token.as_ref().ok_or_else(|| {
                    TestbedError::Other(format!(
                        "projected volume {} has a source other than a serviceAccountToken",
                        volume.name
                    ))
                })?;
                let audiences: Vec<&str> = token.audience.as_deref().into_iter().collect();
                files.insert(
                    token.path.clone(),
                    self.pod_token(pod, &audiences, pod_dir)?,
                );
            }
            (files, projected.default_mode)
        } else {
            return Err(TestbedError::Other(format!(
                "volume {} is of a kind the testbed's kubelet does not implement",
                volume.name
            )));
        };
        write_volume(&dir, &files, default_mode.unwrap_or(0o644), pod.spec)?;
        Ok(dir)
    }

    /// A token of the pod's ServiceAccount bound to the pod, for `audiences` (none: the API
    /// server's), from the TokenRequest API as the kubelet gets it.
    fn pod_token(
        &self,
        pod: &KubeletPod<'_>,
        audiences: &[&str],
        pod_dir: &Path,
    ) -> Result<Vec<u8>> {
        let account = pod
            .spec
            .service_account_name
            .as_deref()
            .unwrap_or("default");
        let file = pod_dir.join("token-request");
        self.api()?.project_token(
            pod.namespace,
            account,
            (pod.name, pod.uid),
            audiences,
            &file,
        )?;
        let token = read(&file)?;
        std::fs::remove_file(&file).io_context(|| format!("removing {}", file.display()))?;
        Ok(token)
    }

    /// The node's paths the chart's hostPath volumes may name, and this node's directories
    /// for them: its bpffs directory, cgroup root and `/run/nodemesh` (the agent's, as on a
    /// node: each node its own), and the network sysctls (per network namespace, so the
    /// host's serve every node).
    pub(crate) fn node_host_paths(&self, node: &str) -> BTreeMap<&'static str, PathBuf> {
        BTreeMap::from([
            ("/sys/fs/bpf", self.bpffs_dir(node)),
            ("/sys/fs/cgroup", self.cgroup_root(node)),
            ("/run/nodemesh", self.node_run_dir(node)),
            ("/proc/sys/net", PathBuf::from("/proc/sys/net")),
        ])
    }

    /// The cgroup the kubelet gives a pod: `kubepods/<QoS class>/pod<uid>` under the node's.
    pub(crate) fn pod_cgroup(&self, node: &str, spec: &PodSpec, uid: &str) -> Result<PathBuf> {
        let dir = self
            .cgroup_root(node)
            .join("kubepods")
            .join(qos_class(spec))
            .join(format!("pod{uid}"));
        cgroup::create(&dir)?;
        Ok(dir)
    }
}

/// The container's environment, in order: the API server's address, which the kubelet
/// gives every pod, then its `env` (values with `$(VAR)` references to the variables
/// before them expanded, and the downward API's pod fields).
fn container_env(pod: &KubeletPod<'_>, container: &Container) -> Result<Vec<(String, String)>> {
    let mut env = vec![
        (
            "KUBERNETES_SERVICE_HOST".to_owned(),
            API_SERVER_IP.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".to_owned(),
            API_SERVER_PORT.to_string(),
        ),
    ];
    for variable in container.env.iter().flatten() {
        let value = match (&variable.value, &variable.value_from) {
            (Some(value), None) => expansion::expand(value, |name| defined(&env, name)),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                match field {
                    Some("spec.nodeName") => pod.node.to_owned(),
                    Some("metadata.name") => pod.name.to_owned(),
                    Some("metadata.namespace") => pod.namespace.to_owned(),
                    Some("metadata.uid") => pod.uid.to_owned(),
                    Some("status.hostIP") => pod.host_ip.to_string(),
                    Some("status.podIP") => pod.pod_ip.to_string(),
                    _ => {
                        return Err(TestbedError::Other(format!(
                            "env {} comes from {from:?}, which the testbed's kubelet does not resolve",
                            variable.name
                        )));
                    }
                }
            }
            _ => String::new(),
        };
        env.push((variable.name.clone(), value));
    }
    Ok(env)
}

/// The value of `name` as defined so far (the last definition counts).
fn defined(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter()
        .rev()
        .find(|(defined, _)| defined == name)
        .map(|(_, value)| value.clone())
}

/// `container` with `$(VAR)` references in its command and args expanded from `env`, as
/// the kubelet does before it asks the runtime to start it.
fn expand_command_and_args(container: &Container, env: &[(String, String)]) -> Container {
    let expand_all = |list: &Option<Vec<String>>| {
        list.as_ref().map(|items| {
            items
                .iter()
                .map(|item| expansion::expand(item, |name| defined(env, name)))
                .collect()
        })
    };
    Container {
        command: expand_all(&container.command),
        args: expand_all(&container.args),
        ..container.clone()
    }
}

/// The pod's QoS class as the kubelet names its cgroup: `guaranteed` pods sit directly
/// under kubepods in reality; here every class has its directory, which is all the agent
/// reads.
fn qos_class(spec: &PodSpec) -> &'static str {
    let resources: Vec<_> = spec
        .containers
        .iter()
        .filter_map(|c| c.resources.as_ref())
        .collect();
    if resources.is_empty() {
        return "besteffort";
    }
    let guaranteed = spec.containers.iter().all(|c| {
        c.resources.as_ref().is_some_and(|r| {
            let limits = r.limits.clone().unwrap_or_default();
            ["cpu", "memory"].iter().all(|k| limits.contains_key(*k))
                && r.requests
                    .as_ref()
                    .is_none_or(|requests| requests.iter().all(|(k, v)| limits.get(k) == Some(v)))
        })
    });
    if guaranteed {
        "guaranteed"
    } else {
        "burstable"
    }
}

fn runtime_dir_of(runtime: &Containerd, uid: &str) -> PathBuf {
    runtime.pods_dir().join(uid)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).io_context(|| format!("reading {}", path.display()))
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .io_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A ConfigMap's or Secret's `data` as file name → content (a Secret's is base64).
fn data_files(data: &Value, what: &str, base64: bool) -> Result<BTreeMap<String, Vec<u8>>> {
    let object = data.as_object().ok_or_else(|| {
        TestbedError::Other(format!(
            "{what} does not exist or has no data: the kubelet would not start the pod"
        ))
    })?;
    object
        .iter()
        .map(|(key, value)| {
            let bad = |e: serde_json::Error| TestbedError::Other(format!("{what}: {key}: {e}"));
            let content = if base64 {
                serde_json::from_value::<k8s_openapi::ByteString>(value.clone())
                    .map_err(bad)?
                    .0
            } else {
                serde_json::from_value::<String>(value.clone())
                    .map_err(bad)?
                    .into_bytes()
            };
            Ok((key.clone(), content))
        })
        .collect()
}

/// Writes a volume's files with `mode`; with the pod's fsGroup, as the kubelet does, the
/// files and the directory belong to that group and the group may read them.
fn write_volume(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    mode: i32,
    pod: &PodSpec,
) -> Result<()> {
    std::fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
    let fs_group = pod.security_context.as_ref().and_then(|c| c.fs_group);
    let mut mode = u32::try_from(mode).unwrap_or(0o644);
    let mut dir_mode = 0o755;
    if fs_group.is_some() {
        mode |= 0o440;
        dir_mode |= 0o2050;
    }
    let gid = fs_group
        .and_then(|g| u32::try_from(g).ok())
        .map(nix::unistd::Gid::from_raw);
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).io_context(|| format!("writing {}", path.display()))?;
        chmod(&path, mode)?;
        nix::unistd::chown(&path, None, gid).io_context(|| format!("chown {}", path.display()))?;
    }
    chmod(dir, dir_mode)?;
    nix::unistd::chown(dir, None, gid).io_context(|| format!("chown {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};

    use super::*;

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn value(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn the_host_ip_is_resolved_and_expanded_in_env_values_command_and_args() {
        let container = Container {
            name: "agent".to_owned(),
            command: Some(vec!["/bin/$(NODE_NAME)".to_owned()]),
            args: Some(vec![
                "--metrics-addr=$(HOST_IP):15090".to_owned(),
                "--literal=$$(HOST_IP)".to_owned(),
                "--unknown=$(NOT_SET)".to_owned(),
            ]),
            env: Some(vec![
                field("NODE_NAME", "spec.nodeName"),
                field("HOST_IP", "status.hostIP"),
                value("LISTEN", "$(HOST_IP):80 before $(LATER)"),
                value("LATER", "x"),
            ]),
            ..Default::default()
        };
        let spec = PodSpec::default();
        let pod = KubeletPod {
            namespace: "nodemesh-system",
            name: "agent-node1",
            uid: "uid-1",
            node: "node1",
            spec: &spec,
            netns: PathBuf::from("/run/netns/node1"),
            host_ip: "198.18.0.1".parse().unwrap(),
            pod_ip: "198.18.0.1".parse().unwrap(),
            cgroup: PathBuf::from("/sys/fs/cgroup/tb/node1/kubepods/podx"),
            host_paths: BTreeMap::new(),
            hosts: Vec::new(),
        };
        let env = container_env(&pod, &container).unwrap();
        assert_eq!(defined(&env, "HOST_IP").as_deref(), Some("198.18.0.1"));
        assert_eq!(
            defined(&env, "LISTEN").as_deref(),
            Some("198.18.0.1:80 before $(LATER)"),
            "only variables defined before it expand"
        );
        let expanded = expand_command_and_args(&container, &env);
        assert_eq!(expanded.command, Some(vec!["/bin/node1".to_owned()]));
        assert_eq!(
            expanded.args,
            Some(vec![
                "--metrics-addr=198.18.0.1:15090".to_owned(),
                "--literal=$(HOST_IP)".to_owned(),
                "--unknown=$(NOT_SET)".to_owned(),
            ])
        );
    }
}
