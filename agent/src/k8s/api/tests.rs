//! The watches against a real kube-apiserver and etcd (the testbed's control plane, started on
//! loopback without nodes, from /var/cache/nodemesh/testenv/bin): lists, watches, field
//! selectors, streaming lists, API discovery of CRDs, conditional status writes and outages
//! are the server's own. Tests share one control plane (each uses namespaces and a node name
//! of its own); those that change what the server serves get one of their own. A test double
//! remains for the two faults the real server cannot be made to produce at a chosen moment
//! (`double.rs`).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
};
use nodemesh_testbed::ControlPlane;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};

use super::ApiWatch;
use crate::{
    k8s::{
        snapshot::ClusterIndices,
        status::{SourceStatus, WatchState},
    },
    state::{
        services::ServiceIndex,
        workloads::{SharedWorkloads, WorkloadIndex},
    },
};

mod double;

/// Discovery looks for missing resources this often in tests (a minute in the agent).
const RECHECK: Duration = Duration::from_millis(500);

/// The shared control plane, with the Gateway API and nodemesh CRDs installed.
fn shared_plane() -> &'static ControlPlane {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let plane = ControlPlane::loopback(&[]).expect(
            "a loopback control plane (scripts/setup.sh builds it into /var/cache/nodemesh/testenv)",
        );
        install_crds(&plane);
        plane
    })
}

fn install_crds(plane: &ControlPlane) {
    let gateway = plane.testenv().gateway_api_crds();
    let http_routes = gateway.join("gateway.networking.k8s.io_httproutes.yaml");
    let ours = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/nodemesh/templates/crds.yaml"
    );
    for crd in [http_routes.display().to_string(), ours.to_owned()] {
        plane
            .kubectl_ok(&["apply", "--server-side", "-f", &crd])
            .expect("installing a CRD");
    }
    plane
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            // Slow on a loaded 2-core machine: the API server establishes CRDs one by one.
            "--timeout=180s",
            "crd",
            "--all",
        ])
        .expect("CRDs established");
}

/// Runs an async test on a runtime of its own (the control plane's calls block).
fn run(test: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(test);
}

async fn client(plane: &ControlPlane, server: Option<SocketAddr>) -> Client {
    let mut kubeconfig = Kubeconfig::read_from(plane.admin_kubeconfig()).expect("kubeconfig");
    if let Some(server) = server {
        for cluster in &mut kubeconfig.clusters {
            if let Some(cluster) = &mut cluster.cluster {
                cluster.server = Some(format!("https://{server}"));
            }
        }
    }
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

/// What one agent's watches hold.
struct Watched {
    watch: ApiWatch,
    indices: ClusterIndices,
    /// The workload index the watches write through `indices`.
    workloads: SharedWorkloads,
    status: Arc<SourceStatus>,
}

impl Watched {
    fn start(client: Client, node: &str) -> Self {
        let workloads = WorkloadIndex::shared("cluster.local");
        let indices = ClusterIndices {
            workloads: workloads.clone(),
            services: ServiceIndex::shared(),
        };
        let status = Arc::new(SourceStatus::default());
        let (changes, _) = mpsc::channel(1);
        let watch = ApiWatch::start(
            client,
            node,
            &indices,
            Arc::clone(&status),
            changes,
            RECHECK,
        );
        Self {
            watch,
            indices,
            workloads,
            status,
        }
    }

    fn identity(&self, ip: &str) -> Option<String> {
        let workloads = self.workloads.read().unwrap();
        workloads
            .identity_of(ip.parse().unwrap())
            .map(ToString::to_string)
    }

    fn workload(&self, ip: &str) -> String {
        let workloads = self.workloads.read().unwrap();
        workloads.peer_of(ip.parse().unwrap()).workload
    }

    fn watch_state(&self, name: &str) -> Option<(WatchState, Option<&'static str>, String)> {
        self.status
            .views()
            .into_iter()
            .find(|w| w.watch == name)
            .map(|w| (w.state, w.initial_list, w.detail.unwrap_or_default()))
    }
}

/// Polls `done` every 20 ms until it holds, 30 s at most.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A namespace (meshed or not) with the ServiceAccount `web` (pod admission requires it).
async fn namespace(client: &Client, name: &str, labels: Value) {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&ns),
        )
        .await
        .expect("namespace");
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": name}})).unwrap();
    let _ = Api::<ServiceAccount>::namespaced(client.clone(), name)
        .create(&PostParams::default(), &account)
        .await;
}

/// A running pod on `node` with address `ip`, as the scheduler and the kubelet leave it.
async fn pod(client: &Client, namespace: &str, name: &str, node: &str, ip: &str, app: &str) {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &pod).await.expect("pod");
    let status = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(
        name,
        &PatchParams::apply("kubelet").force(),
        &Patch::Apply(&status),
    )
    .await
    .expect("pod status");
}

/// Server-side applies an HTTPRoute.
async fn apply_route(client: &Client, route: &Value) {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ));
    let namespace = route["metadata"]["namespace"].as_str().unwrap();
    let name = route["metadata"]["name"].as_str().unwrap();
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource)
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(route),
        )
        .await
        .expect("applying an HTTPRoute");
}

async fn delete_pod(client: &Client, namespace: &str, name: &str) {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
        .expect("deleting a pod");
}

#[test]
fn watches_follow_the_cluster_with_this_nodes_pods_field_selected() {
    let plane = shared_plane();
    run(async {
        let admin = client(plane, None).await;
        namespace(&admin, "follow", json!({"nodemesh.io/mesh": "enabled"})).await;
        pod(&admin, "follow", "a", "follow-node1", "10.91.1.1", "web").await;
        pod(&admin, "follow", "b", "follow-node2", "10.91.2.1", "web").await;

        let agent = Watched::start(client(plane, None).await, "follow-node1");
        agent
            .watch
            .wait_synced(Duration::from_secs(30))
            .await
            .expect("synced");
        let (snapshot, errors) = agent.watch.snapshot();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            snapshot.local_pods.keys().collect::<Vec<_>>(),
            ["follow/a"],
            "only this node's pods are kept whole (field selector)"
        );
        assert!(snapshot.namespaces["follow"].meshed);
        for ip in ["10.91.1.1", "10.91.2.1"] {
            assert_eq!(
                agent.identity(ip).as_deref(),
                Some("spiffe://cluster.local/ns/follow/sa/web"),
                "every pod of the cluster is in the workload index"
            );
        }
        for watch in [
            "Namespaces",
            "Pods (cluster-wide)",
            "this node's Pods",
            "Services",
        ] {
            // A v1.36 server serves streaming lists; the state follows the sync at once.
            eventually(&format!("{watch} watched after a streaming list"), || {
                agent.watch_state(watch).is_some_and(|(state, list, _)| {
                    (state, list) == (WatchState::Watching, Some("streaming"))
                })
            })
            .await;
        }

        // ADDED, MODIFIED (relabelled), DELETED.
        pod(&admin, "follow", "c", "follow-node2", "10.91.2.3", "web").await;
        eventually("c indexed", || agent.identity("10.91.2.3").is_some()).await;
        Api::<Pod>::namespaced(admin.clone(), "follow")
            .patch(
                "b",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"app": "web-v2"}}})),
            )
            .await
            .unwrap();
        eventually("b relabelled", || agent.workload("10.91.2.1") == "web-v2").await;
        delete_pod(&admin, "follow", "b").await;
        eventually("b gone", || agent.identity("10.91.2.1").is_none()).await;

        // A namespace relabelled with an invalid value keeps its last good version.
        namespace(
            &admin,
            "follow",
            json!({"nodemesh.io/mesh": "enabled", "nodemesh.io/peer-authentication": "strikt"}),
        )
        .await;
        eventually("the invalid label reported", || {
            !agent.watch.snapshot().1.is_empty()
        })
        .await;
        let (snapshot, errors) = agent.watch.snapshot();
        assert!(
            errors[0].contains("Namespace follow") && errors[0].contains("strikt"),
            "{errors:?}"
        );
        assert!(
            snapshot.namespaces["follow"].meshed,
            "last good version kept"
        );
        assert!(agent.identity("10.91.1.1").is_some());

        // Out of the mesh: the index keeps the pods, lookups no longer find them meshed.
        namespace(&admin, "follow", json!({})).await;
        eventually("follow unmeshed", || agent.identity("10.91.1.1").is_none()).await;
    });
}

#[test]
fn a_stop_is_an_uninstall_only_when_the_daemonset_is_gone_or_being_deleted() {
    use crate::k8s::installation::{Installation, InstallationWatch};
    let plane = shared_plane();
    run(async {
        let admin = client(plane, None).await;
        namespace(&admin, "uninstall", json!({})).await;
        let watch = InstallationWatch::start(admin.clone(), "uninstall/nodemesh-agent");
        eventually("never installed: removed", || {
            watch.watched() == Installation::Removed
        })
        .await;
        assert_eq!(watch.at_stop().await, Installation::Removed);

        let object: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "nodemesh-agent", "namespace": "uninstall"},
            "spec": {"selector": {"matchLabels": {"app": "a"}},
                     "template": {"metadata": {"labels": {"app": "a"}},
                                  "spec": {"containers": [{"name": "agent", "image": "x"}]}}},
        }))
        .unwrap();
        let api = Api::<DaemonSet>::namespaced(admin.clone(), "uninstall");
        api.create(&PostParams::default(), &object).await.unwrap();
        eventually("present: installed", || {
            watch.watched() == Installation::Installed
        })
        .await;
        assert_eq!(
            watch.at_stop().await,
            Installation::Installed,
            "a restart or an upgrade"
        );
        // Foreground deletion: the object stays, being deleted, until the garbage collector
        // (which no controller-manager runs here) finishes it.
        api.delete("nodemesh-agent", &DeleteParams::foreground())
            .await
            .unwrap();
        eventually("being deleted: removed", || {
            watch.watched() == Installation::Removed
        })
        .await;
        assert_eq!(watch.at_stop().await, Installation::Removed);
    });
}

#[test]
fn readiness_waits_for_the_initial_list_of_every_kind() {
    run(async {
        // Nothing listens on this address: the list cannot complete (no server needed).
        let unreachable = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", unreachable.local_addr().unwrap());
        drop(unreachable);
        let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let agent = Watched::start(client, "node1");
        let error = agent
            .watch
            .wait_synced(Duration::from_millis(1500))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "Namespaces, Pods (cluster-wide), this node's Pods, Services, EndpointSlices, AuthorizationPolicies"
            ),
            "{error}"
        );
        // Each failure says what it was doing and why, not just `client error (Connect)`.
        let (state, _, detail) = agent.watch_state("Pods (cluster-wide)").unwrap();
        assert_eq!(state, WatchState::Retrying);
        assert!(
            detail.contains("Connection refused") && detail.contains("retrying in"),
            "{detail}"
        );
    });
}

#[test]
fn route_status_is_written_once_and_a_stale_write_is_refused() {
    use crate::state::routes::{CONTROLLER_NAME, status_updates};

    let plane = shared_plane();
    run(async {
        let admin = client(plane, None).await;
        namespace(&admin, "routes", json!({})).await;
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "routes"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web-v2", "port": 80}]}]},
        });
        apply_route(&admin, &route).await;
        let agent = Watched::start(client(plane, None).await, "routes-node");
        agent
            .watch
            .wait_synced(Duration::from_secs(30))
            .await
            .unwrap();
        let key = ("routes".to_owned(), "web".to_owned());
        eventually("route listed", || {
            agent.watch.snapshot().0.http_routes.contains_key(&key)
        })
        .await;
        let (snapshot, _) = agent.watch.snapshot();
        let exists = |service: &str| service == "routes/web";
        let mut updates =
            status_updates(&snapshot.http_routes, &[], exists, "2026-11-29T00:00:00Z");
        let mut stale = status_updates(&snapshot.http_routes, &[], exists, "2026-11-30T00:00:00Z");
        let (update, stale) = (updates.remove(0), stale.remove(0));
        super::write_route_status(&admin, &update)
            .await
            .expect("written");
        eventually("status seen", || {
            agent.watch.snapshot().0.http_routes[&key].status.is_some()
        })
        .await;
        let (snapshot, _) = agent.watch.snapshot();
        let ours = &snapshot.http_routes[&key].status.as_ref().unwrap()["parents"][0];
        assert_eq!(ours["controllerName"], CONTROLLER_NAME);
        assert_eq!(ours["conditions"][1]["reason"], "BackendNotFound");
        assert!(
            status_updates(&snapshot.http_routes, &[], exists, "2026-11-30T00:00:00Z").is_empty(),
            "nothing to write once the status is there"
        );
        // Another agent's write computed from the old version is refused by the server.
        match super::write_route_status(&admin, &stale).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 409),
            other => panic!("a stale write must be refused: {other:?}"),
        }
    });
}

/// A TCP relay on loopback in front of the API server that can be cut, as a network outage
/// between one agent and the server (the server itself keeps serving everyone else).
struct Relay {
    addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (flag, tasks) = (Arc::clone(&up), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // Dropped: the connection is reset.
                }
                tasks.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Self {
            addr,
            up,
            connections,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_outage_keeps_the_last_state_and_the_watches_catch_up_when_it_ends() {
    let plane = shared_plane();
    run(async {
        let admin = client(plane, None).await;
        namespace(&admin, "outage", json!({"nodemesh.io/mesh": "enabled"})).await;
        pod(&admin, "outage", "a", "outage-node", "10.92.1.1", "web").await;
        pod(&admin, "outage", "b", "outage-node", "10.92.1.2", "web").await;
        let relay = Relay::start(plane.api_server_addr()).await;
        let agent = Watched::start(client(plane, Some(relay.addr)).await, "outage-node");
        agent
            .watch
            .wait_synced(Duration::from_secs(30))
            .await
            .unwrap();
        let local = |agent: &Watched| -> Vec<String> {
            agent.watch.snapshot().0.local_pods.into_keys().collect()
        };
        assert_eq!(local(&agent), ["outage/a", "outage/b"]);

        // The agent cannot reach the server; the cluster changes meanwhile.
        relay.cut();
        delete_pod(&admin, "outage", "b").await;
        pod(&admin, "outage", "c", "outage-node", "10.92.1.3", "web").await;
        eventually("the watches notice", || {
            agent
                .watch_state("this node's Pods")
                .is_some_and(|(s, _, _)| s == WatchState::Retrying)
        })
        .await;
        // It serves with the last state it knew: nothing un-enrolled for want of a server.
        assert_eq!(local(&agent), ["outage/a", "outage/b"]);
        assert!(agent.identity("10.92.1.2").is_some());

        relay.restore();
        eventually("caught up", || local(&agent) == ["outage/a", "outage/c"]).await;
        eventually("index caught up", || {
            agent.identity("10.92.1.2").is_none() && agent.identity("10.92.1.3").is_some()
        })
        .await;
    });
}

/// A control plane without WatchList and without the CRDs, for the tests that need the
/// server to lack them.
fn bare_plane() -> &'static ControlPlane {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        ControlPlane::loopback(&["--feature-gates=WatchList=false"])
            .expect("a loopback control plane")
    })
}

#[test]
fn a_server_without_streaming_lists_is_listed_in_pages() {
    let plane = bare_plane();
    run(async {
        let admin = client(plane, None).await;
        namespace(&admin, "paged", json!({"nodemesh.io/mesh": "enabled"})).await;
        pod(&admin, "paged", "a", "paged-node", "10.93.1.1", "web").await;
        let agent = Watched::start(client(plane, None).await, "paged-node");
        agent
            .watch
            .wait_synced(Duration::from_secs(30))
            .await
            .expect("synced");
        assert!(agent.identity("10.93.1.1").is_some());
        // The watch reports its state just after the list it synced with: wait for it.
        eventually("the cluster-wide pods watched after a paged list", || {
            agent
                .watch_state("Pods (cluster-wide)")
                .is_some_and(|(state, list, _)| {
                    (state, list) == (WatchState::Watching, Some("paged"))
                })
        })
        .await;
    });
}

#[test]
fn resources_the_server_does_not_serve_are_disabled_until_their_crd_appears() {
    let plane = bare_plane();
    run(async {
        let agent = Watched::start(client(plane, None).await, "discovery-node");
        agent
            .watch
            .wait_synced(Duration::from_secs(30))
            .await
            .expect("synced without waiting for resources that are not served");
        for (watch, group) in [
            (
                "HTTPRoutes",
                "gateway.networking.k8s.io/v1 httproutes is not served",
            ),
            (
                "GRPCRoutes",
                "gateway.networking.k8s.io/v1 grpcroutes is not served",
            ),
            (
                "AuthorizationPolicies",
                "nodemesh.io/v1alpha1 authorizationpolicies is not served",
            ),
        ] {
            let (state, _, detail) = agent.watch_state(watch).expect(watch);
            assert_eq!(state, WatchState::Disabled, "{watch}");
            assert!(
                detail.contains(group) && detail.contains("checking again"),
                "{detail}"
            );
        }

        // The Gateway API CRDs are installed: the routes are watched without a restart.
        install_crds(plane);
        let admin = client(plane, None).await;
        namespace(&admin, "discovery", json!({})).await;
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "discovery"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]},
        });
        apply_route(&admin, &route).await;
        let key = ("discovery".to_owned(), "web".to_owned());
        eventually("the route watched", || {
            agent.watch.snapshot().0.http_routes.contains_key(&key)
        })
        .await;
        eventually("the routes watched", || {
            agent
                .watch_state("HTTPRoutes")
                .is_some_and(|(state, _, _)| state == WatchState::Watching)
        })
        .await;

        // The CRD deleted: its objects go with it and the resource is disabled again.
        plane
            .kubectl_ok(&["delete", "crd", "httproutes.gateway.networking.k8s.io"])
            .expect("deleting the CRD");
        eventually("routes dropped and disabled", || {
            agent.watch.snapshot().0.http_routes.is_empty()
                && agent
                    .watch_state("HTTPRoutes")
                    .is_some_and(|(s, _, _)| s == WatchState::Disabled)
        })
        .await;
    });
}
