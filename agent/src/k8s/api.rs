//! Cluster state from the Kubernetes API server: one watch per kind (Namespaces, Pods,
//! Services, EndpointSlices, Gateway API HTTPRoutes and GRPCRoutes, nodemesh
//! AuthorizationPolicies), each
//! feeding its compact index or table event by event (`watch.rs`, `sinks.rs`).
//!
//! Pods are watched twice: this node's pods with a `spec.nodeName` field selector, which alone
//! decides enrolment (a small watch, so a new pod's event arrives without waiting behind the
//! whole cluster's, and the only pods kept whole enough to enrol), and every pod cluster-wide
//! for the workload index (who owns each meshed address), kept in compact form and read live
//! by the proxies.
//!
//! Readiness: the agent counts as synced once Namespaces, both Pod watches, Services,
//! EndpointSlices and AuthorizationPolicies have completed their first list: an agent that
//! served before knowing the policies would allow what a policy denies. Routes are not
//! waited for, and neither is either optional resource while the API server does not serve
//! it (`discovery.rs`).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    compact::LocalPod,
    discovery::{self, Optional},
    intern::Interner,
    labels::{REGION_LABEL, ZONE_LABEL},
    objects::{
        AuthorizationPolicyObject, Grpc, GrpcRouteObject, Http, HttpRouteObject, RouteKind,
        RouteObject, RouteStatusUpdate,
    },
    sinks::{LocalPodSink, NamespaceSink, ObjectSink, ServiceSink, SliceSink, WorkloadSink, lock},
    snapshot::{ClusterIndices, ClusterSnapshot, Topology},
    status::SourceStatus,
    table::{NamespaceTable, Table},
    watch::{self as watches, Ended, Unsynced, WatchContext},
};

const NAMESPACES: &str = "Namespaces";
const PODS: &str = "Pods (cluster-wide)";
const LOCAL_PODS: &str = "this node's Pods";
const SERVICES: &str = "Services";
const ENDPOINT_SLICES: &str = "EndpointSlices";
const HTTP_ROUTES: &str = "HTTPRoutes";
const GRPC_ROUTES: &str = "GRPCRoutes";
const AUTHORIZATION_POLICIES: &str = "AuthorizationPolicies";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to the Kubernetes API server: {0}")]
    Client(#[from] kube::Error),
    #[error("Kubernetes client configuration: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("the initial list of {kinds} did not complete within {timeout:?}")]
    SyncTimeout { kinds: String, timeout: Duration },
}

type Objects<K> = Arc<Mutex<Table<(String, String), K>>>;

/// The watches' tables, kept current by background tasks until dropped. (The large kinds
/// live in the [`ClusterIndices`], which the proxies read.)
pub struct ApiWatch {
    client: Client,
    namespaces: Arc<Mutex<NamespaceTable>>,
    /// This node's pods by `namespace/name`.
    local_pods: Arc<Mutex<Table<String, LocalPod>>>,
    http_routes: Objects<HttpRouteObject>,
    grpc_routes: Objects<GrpcRouteObject>,
    authorization_policies: Objects<AuthorizationPolicyObject>,
    unsynced: watch::Receiver<Vec<&'static str>>,
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

    /// The client the watches use.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Starts the watches; `changes` gets a message (coalesced) after every change the
    /// reconciler must see; `status` follows each watch; resources the server does not serve
    /// are looked for again every `recheck` ([`discovery::RECHECK`] in the agent).
    pub fn start(
        client: Client,
        node: &str,
        indices: &ClusterIndices,
        status: Arc<SourceStatus>,
        changes: mpsc::Sender<()>,
        recheck: Duration,
    ) -> Self {
        let (unsynced_tx, unsynced_rx) = watch::channel(vec![
            NAMESPACES,
            PODS,
            LOCAL_PODS,
            SERVICES,
            ENDPOINT_SLICES,
            AUTHORIZATION_POLICIES,
        ]);
        let contexts = Contexts {
            status,
            unsynced: Arc::new(unsynced_tx),
            changes,
        };
        let namespaces = Arc::new(Mutex::new(NamespaceTable::default()));
        let local_pods = Arc::new(Mutex::new(Table::default()));
        let http_routes: Objects<HttpRouteObject> = Arc::default();
        let grpc_routes: Objects<GrpcRouteObject> = Arc::default();
        let authorization_policies: Objects<AuthorizationPolicyObject> = Arc::default();
        let mut tasks = core_watches(&client, node, indices, &namespaces, &local_pods, &contexts);
        tasks.push(tokio::spawn(follow_topology(
            client.clone(),
            node.to_owned(),
            indices.clone(),
        )));
        tasks.push(tokio::spawn(discovery::run(
            client.clone(),
            recheck,
            vec![
                optional(
                    &client,
                    contexts.optional(HTTP_ROUTES, "/apis/gateway.networking.k8s.io/v1/httproutes"),
                    ("gateway.networking.k8s.io/v1", "httproutes"),
                    "Service traffic is not routed by HTTPRoutes",
                    &http_routes,
                ),
                optional(
                    &client,
                    contexts.optional(GRPC_ROUTES, "/apis/gateway.networking.k8s.io/v1/grpcroutes"),
                    ("gateway.networking.k8s.io/v1", "grpcroutes"),
                    "gRPC calls to Services are not routed by GRPCRoutes",
                    &grpc_routes,
                ),
                optional(
                    &client,
                    contexts.optional(
                        AUTHORIZATION_POLICIES,
                        "/apis/nodemesh.io/v1alpha1/authorizationpolicies",
                    ),
                    ("nodemesh.io/v1alpha1", "authorizationpolicies"),
                    "no AuthorizationPolicy applies (the mesh allows by default)",
                    &authorization_policies,
                ),
            ],
        )));
        Self {
            client,
            namespaces,
            local_pods,
            http_routes,
            grpc_routes,
            authorization_policies,
            unsynced: unsynced_rx,
            tasks,
        }
    }

    /// Waits until every kind the agent needs has been listed once.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), ApiError> {
        let mut unsynced = self.unsynced.clone();
        let synced = unsynced.wait_for(Vec::is_empty);
        match tokio::time::timeout(timeout, synced).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ApiError::SyncTimeout {
                kinds: self.unsynced.borrow().join(", "),
                timeout,
            }),
        }
    }

    /// The current state of the small kinds, and the objects rejected (whose last good
    /// version is used).
    pub fn snapshot(&self) -> (ClusterSnapshot, Vec<String>) {
        let namespaces = lock(&self.namespaces);
        let snapshot = ClusterSnapshot {
            namespaces: namespaces.to_map(),
            local_pods: lock(&self.local_pods).to_map(),
            http_routes: lock(&self.http_routes).to_map(),
            grpc_routes: lock(&self.grpc_routes).to_map(),
            authorization_policies: lock(&self.authorization_policies).to_map(),
        };
        (snapshot, namespaces.errors())
    }
}

/// What every watch reports to: the source's status, the kinds not listed yet, the
/// reconciler's change notifications.
struct Contexts {
    status: Arc<SourceStatus>,
    unsynced: Unsynced,
    changes: mpsc::Sender<()>,
}

impl Contexts {
    /// The context of the watch `name` of `resource`; `notify`: its changes wake the
    /// reconciler.
    fn of(&self, name: &'static str, resource: String, notify: bool) -> WatchContext {
        WatchContext {
            name,
            resource,
            status: Arc::clone(&self.status),
            unsynced: Arc::clone(&self.unsynced),
            changes: notify.then(|| self.changes.clone()),
            optional: false,
        }
    }

    /// The context of a resource the API server may not serve.
    fn optional(&self, name: &'static str, resource: &str) -> WatchContext {
        WatchContext {
            optional: true,
            ..self.of(name, resource.into(), true)
        }
    }
}

/// The watches of the kinds every API server serves: Namespaces, Pods (cluster-wide and
/// this node's), Services, EndpointSlices.
fn core_watches(
    client: &Client,
    node: &str,
    indices: &ClusterIndices,
    namespaces: &Arc<Mutex<NamespaceTable>>,
    local_pods: &Arc<Mutex<Table<String, LocalPod>>>,
    contexts: &Contexts,
) -> Vec<JoinHandle<()>> {
    let everything = watcher::Config::default();
    let local_selector = format!("spec.nodeName={node}");
    vec![
        spawn(watches::run(
            Api::<Namespace>::all(client.clone()),
            everything.clone(),
            NamespaceSink {
                table: Arc::clone(namespaces),
                workloads: Arc::clone(&indices.workloads),
                listing: false,
            },
            contexts.of(NAMESPACES, "/api/v1/namespaces".into(), true),
        )),
        spawn(watches::run(
            Api::<Pod>::all(client.clone()),
            everything.clone(),
            WorkloadSink {
                index: Arc::clone(&indices.workloads),
                strings: Interner::default(),
            },
            // The proxies read the index live: nothing to recompute.
            contexts.of(PODS, "/api/v1/pods".into(), false),
        )),
        spawn(watches::run(
            Api::<Pod>::all(client.clone()),
            everything.clone().fields(&local_selector),
            LocalPodSink {
                table: Arc::clone(local_pods),
            },
            contexts.of(
                LOCAL_PODS,
                format!("/api/v1/pods?fieldSelector={local_selector}"),
                true,
            ),
        )),
        spawn(watches::run(
            Api::<Service>::all(client.clone()),
            everything.clone(),
            ServiceSink {
                index: Arc::clone(&indices.services),
                strings: Interner::default(),
            },
            contexts.of(SERVICES, "/api/v1/services".into(), true),
        )),
        spawn(watches::run(
            Api::<EndpointSlice>::all(client.clone()),
            everything,
            SliceSink {
                index: Arc::clone(&indices.services),
                strings: Interner::default(),
            },
            contexts.of(
                ENDPOINT_SLICES,
                "/apis/discovery.k8s.io/v1/endpointslices".into(),
                true,
            ),
        )),
    ]
}

fn spawn(watch: impl std::future::Future<Output = Ended> + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        watch.await;
    })
}

/// An optional resource kept whole in `table`; its objects are dropped when its watch ends
/// (the server stopped serving it).
fn optional<K>(
    client: &Client,
    ctx: WatchContext,
    (group_version, plural): (&'static str, &'static str),
    without_it: &'static str,
    table: &Objects<K>,
) -> Optional
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (client, start_ctx, table) = (client.clone(), ctx.clone(), Arc::clone(table));
    Optional {
        ctx,
        group_version,
        plural,
        without_it,
        start: Box::new(move || {
            let (api, ctx, table) = (
                Api::<K>::all(client.clone()),
                start_ctx.clone(),
                Arc::clone(&table),
            );
            Box::pin(async move {
                let changes = ctx.changes.clone();
                let sink = ObjectSink {
                    table: Arc::clone(&table),
                };
                let ended = watches::run(api, watcher::Config::default(), sink, ctx).await;
                lock(&table).clear();
                if let Some(changes) = changes {
                    let _ = changes.try_send(());
                }
                ended
            })
        }),
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
                let route = format!("{}/{}", update.namespace, update.name);
                let kind = update.kind;
                match write_route_status(&client, &update).await {
                    Ok(()) => tracing::info!(%route, "{kind} status written"),
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::debug!(%route, "{kind} changed meanwhile; its status is written on the next pass")
                    }
                    Err(error) => {
                        let error = watches::client_error(&error);
                        tracing::warn!(%route, "writing the status of {kind} {route} failed: {error}; it is written again on a later pass")
                    }
                }
            }
        });
    }
}

/// Writes one route's status, on condition that the route is still at the resourceVersion
/// the status was computed from (409 Conflict otherwise).
pub async fn write_route_status(
    client: &Client,
    update: &RouteStatusUpdate,
) -> Result<(), kube::Error> {
    if update.kind == Grpc::KIND {
        patch_route_status::<Grpc>(client, update).await
    } else {
        patch_route_status::<Http>(client, update).await
    }
}

async fn patch_route_status<K: RouteKind>(
    client: &Client,
    update: &RouteStatusUpdate,
) -> Result<(), kube::Error> {
    let api: Api<RouteObject<K>> = Api::namespaced(client.clone(), &update.namespace);
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": update.resource_version},
        "status": {"parents": update.parents},
    });
    api.patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Follows the Nodes' zone and region labels (a metadata-only watch of every Node: a
/// cloud's node controller often labels a node after it registered, and after the agent
/// started) into the Service index: this node's zone and region, and each zone's region.
async fn follow_topology(client: Client, node: String, indices: ClusterIndices) {
    use futures_util::StreamExt;
    use kube::{
        api::PartialObjectMeta,
        runtime::{WatchStreamExt, watcher::Event},
    };
    let api: Api<PartialObjectMeta<k8s_openapi::api::core::v1::Node>> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut topology = Topology::new(&node);
    let mut published = None;
    while let Some(event) = events.next().await {
        let (meta, gone) = match event {
            Ok(Event::InitApply(object) | Event::Apply(object)) => (object.metadata, false),
            Ok(Event::Delete(object)) => (object.metadata, true),
            Ok(Event::Init | Event::InitDone) => continue,
            Err(error) => {
                tracing::warn!(%node, %error, "watching the Nodes' zones failed; retrying with backoff");
                continue;
            }
        };
        // A deleted Node has no place any more (its zone's region was taken in before).
        let label = |key| {
            super::labels::label(&meta, key)
                .filter(|_| !gone)
                .map(Arc::from)
        };
        let local = meta.name.as_deref() == Some(node.as_str());
        topology.observe(local, label(ZONE_LABEL), label(REGION_LABEL));
        if published.as_ref() != Some(&topology) {
            indices
                .services
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .set_topology(topology.clone());
            published = Some(topology.clone());
        }
    }
}

#[cfg(test)]
mod tests;
