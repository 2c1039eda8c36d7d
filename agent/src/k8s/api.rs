//! Cluster state from the Kubernetes API server: one kube-rs reflector per kind (Namespaces,
//! Pods, Services, EndpointSlices, Gateway API HTTPRoutes, nodemesh AuthorizationPolicies),
//! each a list followed by a watch. HTTPRoutes are not part of the initial sync: a cluster
//! without the Gateway API CRDs has no routes, and the mesh must not wait for them (their
//! watch retries with backoff and logs). AuthorizationPolicies are: an agent that served
//! before knowing them would allow what a policy denies (the chart installs their CRD).
//!
//! The list/watch protocol is kube-rs's watcher: it lists, then watches from the list's
//! resourceVersion with bookmarks on, resumes from the last resourceVersion (or bookmark)
//! after a dropped connection, relists when the server answers 410 Gone, and backs off
//! exponentially while the server is unreachable. The reflector stores replace their contents
//! on each relist, so objects deleted while the watch was down disappear too. The agent only
//! counts as synced once every store has completed its first list.
//!
//! Pods are watched twice, both trimmed to the fields the mesh reads: this node's pods with a
//! `spec.nodeName` field selector, which alone decides enrolment (a small watch, so a new
//! pod's event arrives without waiting behind the whole cluster's), and every pod
//! cluster-wide for the workload index (every meshed pod's address and identity). The
//! snapshot takes this node's pods from the first and all others from the second, so the two
//! can never disagree about a local pod.

use std::{collections::BTreeMap, fmt::Debug, hash::Hash, sync::Mutex, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

use super::snapshot::ClusterSnapshot;
use crate::state::{
    authorization::AuthorizationPolicyObject,
    membership,
    routes::{HttpRouteObject, RouteStatusUpdate},
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to the Kubernetes API server: {0}")]
    Client(#[from] kube::Error),
    #[error("Kubernetes client configuration: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("the initial list of {kinds} did not complete within {timeout:?}")]
    SyncTimeout { kinds: String, timeout: Duration },
}

/// The reflector stores, kept current by background tasks until dropped.
pub struct ApiWatch {
    client: Client,
    node: String,
    namespaces: Store<Namespace>,
    /// Every pod of the cluster (the workload index).
    pods: Store<Pod>,
    /// This node's pods (enrolment), field-selected by `spec.nodeName`.
    local_pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    http_routes: Store<HttpRouteObject>,
    authorization_policies: Store<AuthorizationPolicyObject>,
    /// The last version of each namespace that passed validation.
    last_good_namespaces: Mutex<BTreeMap<String, Namespace>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ApiWatch {
    /// A client from the in-cluster configuration or KUBECONFIG.
    pub async fn infer_client() -> Result<Client, ApiError> {
        let config = kube::Config::infer().await?;
        Ok(Client::try_from(config)?)
    }

    /// Starts the watches; `changes` gets a message (coalesced) after every event.
    pub fn start(client: Client, node: &str, changes: mpsc::Sender<()>) -> Self {
        let client_for_writes = client.clone();
        let mut tasks = Vec::new();
        let everything = watcher::Config::default();
        let namespaces = reflect(
            Api::all(client.clone()),
            everything.clone(),
            trim_metadata::<Namespace>,
            &changes,
            &mut tasks,
        );
        let pods = reflect(
            Api::all(client.clone()),
            everything.clone(),
            trim_pod,
            &changes,
            &mut tasks,
        );
        let local_pods = reflect(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            trim_pod,
            &changes,
            &mut tasks,
        );
        let services = reflect(
            Api::all(client.clone()),
            everything.clone(),
            trim_metadata::<Service>,
            &changes,
            &mut tasks,
        );
        let endpoint_slices = reflect(
            Api::all(client.clone()),
            everything.clone(),
            trim_metadata::<EndpointSlice>,
            &changes,
            &mut tasks,
        );
        let http_routes = reflect(
            Api::all(client.clone()),
            everything.clone(),
            trim_metadata::<HttpRouteObject>,
            &changes,
            &mut tasks,
        );
        let authorization_policies = reflect(
            Api::all(client),
            everything,
            trim_metadata::<AuthorizationPolicyObject>,
            &changes,
            &mut tasks,
        );
        Self {
            client: client_for_writes,
            node: node.to_owned(),
            namespaces,
            pods,
            local_pods,
            services,
            endpoint_slices,
            http_routes,
            authorization_policies,
            last_good_namespaces: Mutex::default(),
            tasks,
        }
    }

    /// Waits until every kind has been listed once.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), ApiError> {
        let all = async {
            let _ = self.namespaces.wait_until_ready().await;
            let _ = self.pods.wait_until_ready().await;
            let _ = self.local_pods.wait_until_ready().await;
            let _ = self.services.wait_until_ready().await;
            let _ = self.endpoint_slices.wait_until_ready().await;
            let _ = self.authorization_policies.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| ApiError::SyncTimeout {
                kinds: self.unsynced().join(", "),
                timeout,
            })
    }

    fn unsynced(&self) -> Vec<&'static str> {
        [
            ("Namespaces", synced(&self.namespaces)),
            ("Pods", synced(&self.pods)),
            ("this node's Pods", synced(&self.local_pods)),
            ("Services", synced(&self.services)),
            ("EndpointSlices", synced(&self.endpoint_slices)),
            (
                "AuthorizationPolicies",
                synced(&self.authorization_policies),
            ),
        ]
        .into_iter()
        .filter(|(_, synced)| !synced)
        .map(|(kind, _)| kind)
        .collect()
    }

    /// The current state, and the objects rejected (whose last good version is used).
    pub fn snapshot(&self) -> (ClusterSnapshot, Vec<String>) {
        let mut errors = Vec::new();
        let mut last_good = self
            .last_good_namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut namespaces = BTreeMap::new();
        for namespace in self.namespaces.state() {
            let name = namespace.metadata.name.clone().unwrap_or_default();
            match membership::peer_authentication(&namespace) {
                Ok(_) => {
                    last_good.insert(name.clone(), (*namespace).clone());
                    namespaces.insert(name, (*namespace).clone());
                }
                Err(error) => {
                    errors.push(format!(
                        "Namespace {name} (API server): {error}; keeping its last good version"
                    ));
                    if let Some(good) = last_good.get(&name) {
                        namespaces.insert(name, good.clone());
                    }
                }
            }
        }
        last_good.retain(|name, _| namespaces.contains_key(name));
        let mut pods = by_namespaced_name(&self.pods);
        pods.retain(|_, pod| {
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(self.node.as_str())
        });
        pods.extend(by_namespaced_name(&self.local_pods));
        let snapshot = ClusterSnapshot {
            namespaces,
            pods,
            services: by_namespaced_name(&self.services),
            endpoint_slices: by_namespaced_name(&self.endpoint_slices),
            http_routes: by_namespaced_name(&self.http_routes),
            authorization_policies: by_namespaced_name(&self.authorization_policies),
        };
        (snapshot, errors)
    }
}

impl ApiWatch {
    /// Writes route status in the background. Every agent computes the same status; each
    /// write is conditional on the resourceVersion it was computed from, so when several
    /// agents race, one wins, the others get 409 Conflict, and their next pass sees the
    /// status already there and writes nothing.
    pub fn write_route_statuses(&self, updates: Vec<RouteStatusUpdate>) {
        if updates.is_empty() {
            return;
        }
        let client = self.client.clone();
        tokio::spawn(async move {
            for update in updates {
                let api: Api<HttpRouteObject> = Api::namespaced(client.clone(), &update.namespace);
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": update.resource_version},
                    "status": {"parents": update.parents},
                });
                let route = format!("{}/{}", update.namespace, update.name);
                match api
                    .patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => tracing::info!(%route, "HTTPRoute status written"),
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::debug!(%route, "HTTPRoute changed meanwhile; its status is written on the next pass")
                    }
                    Err(error) => {
                        tracing::warn!(%route, %error, "writing HTTPRoute status failed")
                    }
                }
            }
        });
    }
}

/// Whether the DaemonSet `namespace/name` is gone or being deleted: the agent's SIGTERM is
/// then an uninstall, not a restart or an upgrade.
pub async fn daemonset_is_going(client: Client, daemonset: &str) -> Result<bool, kube::Error> {
    let (namespace, name) = daemonset.split_once('/').unwrap_or(("default", daemonset));
    let found = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client, namespace)
        .get_opt(name)
        .await?;
    Ok(found.is_none_or(|ds| ds.metadata.deletion_timestamp.is_some()))
}

/// Whether the store has completed its first list (it then answers `wait_until_ready` at once).
fn synced<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    futures_util::FutureExt::now_or_never(store.wait_until_ready()).is_some()
}

fn by_namespaced_name<K>(store: &Store<K>) -> BTreeMap<(String, String), K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    store
        .state()
        .into_iter()
        .map(|object| {
            let meta = object.meta();
            (
                (
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                ),
                (*object).clone(),
            )
        })
        .collect()
}

/// Runs one reflector in the background and returns its store.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    changes: &mpsc::Sender<()>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    let changes = changes.clone();
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // A full channel already holds a wake-up: nothing is lost.
                Ok(_) => {
                    let _ = changes.try_send(());
                }
                Err(error) => {
                    tracing::warn!(%kind, %error, "Kubernetes watch failed; retrying with backoff")
                }
            }
        }
    }));
    reader
}

/// HTTPRoute (gateway.networking.k8s.io/v1) as kube-rs sees it; its spec is converted by
/// `state::routes`, which reports what is wrong with it.
impl Resource for HttpRouteObject {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "HTTPRoute".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "gateway.networking.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "httproutes".into()
    }
    fn meta(&self) -> &kube::core::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        &mut self.metadata
    }
}

/// AuthorizationPolicy (nodemesh.io/v1alpha1), converted by `state::authorization`.
impl Resource for AuthorizationPolicyObject {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "AuthorizationPolicy".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "nodemesh.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "authorizationpolicies".into()
    }
    fn meta(&self) -> &kube::core::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        &mut self.metadata
    }
}

fn trim_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Keeps only what membership and the workload index read.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        service_account_name: spec.service_account_name,
        host_network: spec.host_network,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests;
