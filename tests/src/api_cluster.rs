//! The testbed's cluster on a real API server: the parts of Kubernetes that no process here
//! runs are played by the testbed, through the API, the way the real components write:
//! - installing: the Gateway API CRDs with `kubectl apply`, the chart with `helm install`;
//! - kubelet: Node objects (with the kernel version), Pod status (phase, IPs, Ready) through
//!   the status subresource once the pod's network and cgroups exist, deletion in two steps
//!   (graceful, then final once the processes are gone);
//! - scheduler: `spec.nodeName` set at creation;
//! - ServiceAccount controller: the ServiceAccounts pods name;
//! - DaemonSet controller and token projection: one agent Pod per node, bound to it, and the
//!   agent's projected tokens (API audience, and `nodemesh` for the CA) from the TokenRequest
//!   API, so the API server itself puts the node's name in them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{
            HostIP, Node, NodeAddress, NodeStatus, NodeSystemInfo, PodCondition, PodIP, PodStatus,
            ServiceAccount,
        },
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

use crate::{
    Pod,
    control_plane::ControlPlane,
    error::{IoContext, Result, TestbedError},
};

/// The chart's release name and namespace, as `docs/install.md` installs it.
pub const RELEASE: &str = "nodemesh";
/// The namespace the chart installs into.
pub const SYSTEM_NAMESPACE: &str = "nodemesh-system";
/// The agents' DaemonSet (the chart's).
pub const AGENT_DAEMONSET: &str = "nodemesh-agent";
/// The agents' ServiceAccount (the chart's).
pub const AGENT_SERVICE_ACCOUNT: &str = "nodemesh-agent";
/// The CA's ServiceAccount (the chart's).
pub const CA_SERVICE_ACCOUNT: &str = "nodemesh-ca";
/// The audience of the token agents present to the CA.
pub const CA_AUDIENCE: &str = "nodemesh";
/// The field manager of what the testbed writes as kubelet.
const KUBELET_MANAGER: &str = "nodemesh-testbed-kubelet";
/// Lifetime of the tokens the testbed requests (longer than any test).
const TOKEN_SECONDS: i64 = 3 * 3600;

/// The agent Pod the testbed creates on `node`, as the DaemonSet controller would.
pub fn agent_pod_name(node: &str) -> String {
    format!("nodemesh-agent-{node}")
}

impl ControlPlane {
    /// Installs the Gateway API CRDs (`kubectl apply`) and the chart (`helm install` with
    /// `values` files, as docs/install.md does), and waits until every CRD is established.
    pub fn install(&self, chart: &Path, values: &[PathBuf]) -> Result<()> {
        let gateway_api = self.testenv().gateway_api_crds().display().to_string();
        self.kubectl_ok(&["apply", "--server-side", "-f", &gateway_api])?;
        let mut helm = std::process::Command::new(self.testenv().bin("helm")?);
        helm.args(["install", RELEASE])
            .arg(chart)
            .args(["--namespace", SYSTEM_NAMESPACE, "--create-namespace"])
            .env("KUBECONFIG", self.admin_kubeconfig());
        for file in values {
            helm.arg("--values").arg(file);
        }
        self.helm(helm, &format!("helm install {RELEASE} {}", chart.display()))?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ])?;
        Ok(())
    }

    /// `helm uninstall` of the chart, as docs/install.md uninstalls it.
    pub fn uninstall(&self) -> Result<()> {
        let mut helm = std::process::Command::new(self.testenv().bin("helm")?);
        helm.args(["uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE])
            .env("KUBECONFIG", self.admin_kubeconfig());
        self.helm(helm, &format!("helm uninstall {RELEASE}"))
    }

    fn helm(&self, command: std::process::Command, described: &str) -> Result<()> {
        let output = self.output_in_netns(command)?;
        if output.status.success() {
            Ok(())
        } else {
            Err(TestbedError::Command {
                command: described.to_owned(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }

    /// Replaces the HTTPRoute CRD with Gateway API's experimental channel, which adds the
    /// fields the standard channel does not have yet (`retry`), as a user who wants them
    /// would.
    pub fn install_experimental_http_routes(&self) -> Result<()> {
        let crd = self
            .testenv()
            .gateway_api_crds()
            .join("experimental/gateway.networking.k8s.io_httproutes.yaml");
        let crd = crd.display().to_string();
        // Gateway API's own admission policy refuses experimental CRDs over standard ones
        // unless it is removed first, as its message says.
        self.kubectl_ok(&[
            "delete",
            "validatingadmissionpolicy",
            "safe-upgrades.gateway.networking.k8s.io",
            "--ignore-not-found",
        ])?;
        // The API server takes a moment to drop a deleted admission policy.
        crate::wait::wait_until(
            std::time::Duration::from_secs(30),
            "the experimental HTTPRoute CRD to be admitted",
            || {
                self.kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &crd])
                    .map(|_| true)
            },
        )?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/httproutes.gateway.networking.k8s.io",
        ])?;
        Ok(())
    }

    /// Creates (or updates) a Node and reports its status as its kubelet would.
    pub fn register_node(&self, name: &str, ip: std::net::Ipv4Addr) -> Result<()> {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_owned(), name.to_owned()),
                    ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        self.apply(&node)?;
        let status = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: name.to_owned(),
                    },
                ]),
                node_info: Some(NodeSystemInfo {
                    kernel_version: kernel_release(),
                    os_image: "nodemesh testbed".into(),
                    operating_system: "linux".into(),
                    architecture: std::env::consts::ARCH.into(),
                    container_runtime_version: "testbed://0".into(),
                    kubelet_version: "v1.36.3".into(),
                    ..Default::default()
                }),
                conditions: Some(vec![k8s_openapi::api::core::v1::NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.apply_status(&to_value(&status)?, KUBELET_MANAGER)
    }

    /// Creates a Namespace, or sets its labels to exactly `labels`.
    pub fn apply_namespace(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        self.apply(&json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .map(|_| ())
    }

    /// Creates a ServiceAccount (pods' admission requires it to exist).
    pub fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        self.apply(&json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }))
        .map(|_| ())
    }

    /// Creates or updates a pod's object (spec and labels: what a user or controller writes,
    /// applied whole, as server-side apply wants) and returns the UID the API server gave it.
    pub fn apply_pod(&self, object: &k8s_openapi::api::core::v1::Pod) -> Result<String> {
        let mut object = object.clone();
        object.status = None;
        object.metadata.uid = None;
        if let Some(namespace) = &object.metadata.namespace {
            let account = object
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            self.ensure_service_account(namespace, &account)?;
        }
        let created = self.apply(&object)?;
        created.metadata.uid.ok_or_else(|| {
            TestbedError::Other(format!(
                "the API server returned pod {:?} without a uid",
                object.metadata.name
            ))
        })
    }

    /// Reports a pod's status (running, ready, its IPs) as the kubelet does.
    pub fn report_pod_status(&self, object: &k8s_openapi::api::core::v1::Pod) -> Result<()> {
        let value = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": object.metadata.name, "namespace": object.metadata.namespace},
            "status": object.status,
        });
        self.apply_status(&value, KUBELET_MANAGER)
    }

    /// Deletes a pod as a user and then its kubelet do: gracefully first (it is terminating
    /// while `stop` runs), then for good once its processes are gone.
    pub fn delete_pod(&self, pod: &Pod, stop: impl FnOnce() -> Result<()>) -> Result<()> {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name(), "namespace": pod.namespace()},
        });
        self.delete(&object, None)?;
        stop()?;
        self.delete(&object, Some(0))
    }

    /// The agent Pod of `node`, made from the chart's DaemonSet template (labels,
    /// annotations, the whole spec) and bound to the node, as the DaemonSet controller does;
    /// then reported running with the node's address, as its kubelet does. Returns its UID.
    pub fn create_agent_pod(&self, node: &str, node_ip: std::net::Ipv4Addr) -> Result<String> {
        let api: Api<DaemonSet> = Api::namespaced(self.client(), SYSTEM_NAMESPACE);
        let what = format!("reading DaemonSet {SYSTEM_NAMESPACE}/{AGENT_DAEMONSET}");
        let daemonset = self.run(async move {
            api.get(AGENT_DAEMONSET)
                .await
                .map_err(|source| TestbedError::Kube { what, source })
        })?;
        let template = daemonset.spec.template;
        let mut metadata = template.metadata.unwrap_or_default();
        metadata.name = Some(agent_pod_name(node));
        metadata.namespace = Some(SYSTEM_NAMESPACE.to_owned());
        metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "DaemonSet".into(),
            name: AGENT_DAEMONSET.into(),
            uid: daemonset.metadata.uid.unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        let mut spec = template.spec.unwrap_or_default();
        spec.node_name = Some(node.to_owned());
        let ip = node_ip.to_string();
        let object = k8s_openapi::api::core::v1::Pod {
            metadata,
            spec: Some(spec),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.clone()),
                pod_ips: Some(vec![PodIP { ip: ip.clone() }]),
                host_ip: Some(ip.clone()),
                host_ips: Some(vec![HostIP { ip }]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let uid = self.apply_pod(&object)?;
        self.report_pod_status(&object)?;
        Ok(uid)
    }

    /// A token of `namespace/service_account` bound to `pod` (name, uid), for `audiences`
    /// (empty: the API server's own), written to `file`: what the kubelet projects.
    pub fn project_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: (&str, &str),
        audiences: &[&str],
        file: &Path,
    ) -> Result<PathBuf> {
        let audiences: Vec<String> = audiences.iter().map(|a| (*a).to_owned()).collect();
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: (!audiences.is_empty()).then_some(audiences),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.0.to_owned()),
                    uid: Some(pod.1.to_owned()),
                }),
                expiration_seconds: Some(TOKEN_SECONDS),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let account = service_account.to_owned();
        let what = format!("requesting a token of {namespace}/{service_account}");
        let token = self.run(async move {
            api.create_token_request(&account, &PostParams::default(), &request)
                .await
                .map_err(|source| TestbedError::Kube { what, source })
        })?;
        let token = token.status.and_then(|s| s.token).ok_or_else(|| {
            TestbedError::Other("a TokenRequest came back without a token".into())
        })?;
        std::fs::write(file, token).io_context(|| format!("writing {}", file.display()))?;
        Ok(file.to_owned())
    }
}

fn to_value(object: &impl serde::Serialize) -> Result<Value> {
    serde_json::to_value(object)
        .map_err(|e| TestbedError::Other(format!("serialising an object: {e}")))
}

/// This machine's kernel release (what a node's kubelet reports as `kernelVersion`).
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
