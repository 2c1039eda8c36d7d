//! The watchers against a list/watch test double: an HTTP server on loopback that speaks the
//! API server's list and watch protocol with real Kubernetes JSON (k8s-openapi objects):
//! lists carry a resourceVersion, watches replay the event log from the requested version,
//! answer 410 Gone (as an ERROR event with a Status) for a compacted version, send BOOKMARKs,
//! and can be cut mid-stream. No API server can run here; this is the same code path.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};

use super::ApiWatch;
use crate::k8s::snapshot::ClusterSnapshot;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const AUTHORIZATION_POLICIES: &str = "/apis/nodemesh.io/v1alpha1/authorizationpolicies";

enum WatchMessage {
    Event(Value),
    /// Cut the connection without finishing the chunked body (a reset).
    Reset,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, watch event) for every change, for watches that resume.
    log: Vec<(u64, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    watchers: Vec<Watcher>,
}

/// An open watch, with the node its field selector asks for (if any).
struct Watcher {
    node: Option<String>,
    tx: mpsc::UnboundedSender<WatchMessage>,
}

/// `spec.nodeName=<node>` of a `fieldSelector` query parameter (URL-encoded).
fn selected_node(query: &HashMap<String, String>) -> Option<String> {
    let selector = query.get("fieldSelector")?.replace("%3D", "=");
    selector.strip_prefix("spec.nodeName=").map(str::to_owned)
}

/// Whether an object passes a watch's or list's node selector.
fn on_node(node: Option<&str>, object: &Value) -> bool {
    node.is_none_or(|node| object["spec"]["nodeName"] == node)
}

/// The request log's suffix for a node selector.
fn selector_suffix(node: Option<&str>) -> String {
    node.map(|n| format!(" spec.nodeName={n}"))
        .unwrap_or_default()
}

#[derive(Default)]
struct State {
    resource_version: u64,
    collections: HashMap<&'static str, Collection>,
    /// DaemonSets by `namespace/name`, answered to GETs.
    daemonsets: BTreeMap<String, Value>,
    /// Every request: "LIST <path>" or "WATCH <path> rv=<resourceVersion>", each followed
    /// by " spec.nodeName=<node>" when field-selected; "REFUSED <path>" during an outage.
    requests: Vec<String>,
    /// While set, every list and watch is answered 503 (the API server is down).
    outage: bool,
}

#[derive(Clone)]
struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeApiServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        for path in [
            NAMESPACES,
            PODS,
            SERVICES,
            ENDPOINT_SLICES,
            HTTP_ROUTES,
            AUTHORIZATION_POLICIES,
        ] {
            state
                .lock()
                .unwrap()
                .collections
                .insert(path, Collection::default());
        }
        let server = Self { addr, state };
        let handler = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            if request.method() == hyper::Method::PATCH {
                                let path = request.uri().path().to_owned();
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let patch = serde_json::from_slice(&body).unwrap();
                                return Ok::<_, Infallible>(handler.patch_status(&path, patch));
                            }
                            Ok::<_, Infallible>(handler.serve(request))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).unwrap()
    }

    fn serve(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let path = request.uri().path().to_owned();
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut state = self.state.lock().unwrap();
        let current = state.resource_version;
        if let Some(rest) = path.strip_prefix("/apis/apps/v1/namespaces/") {
            let key = rest.replacen("/daemonsets/", "/", 1);
            return match state.daemonsets.get(&key) {
                Some(daemonset) => json_response(200, daemonset.clone()),
                None => json_response(
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            };
        }
        let Some(key) = [
            NAMESPACES,
            PODS,
            SERVICES,
            ENDPOINT_SLICES,
            HTTP_ROUTES,
            AUTHORIZATION_POLICIES,
        ]
        .into_iter()
        .find(|p| *p == path) else {
            return json_response(404, json!({"kind": "Status", "code": 404}));
        };
        if state.outage {
            state.requests.push(format!("REFUSED {path}"));
            return json_response(
                503,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "ServiceUnavailable", "code": 503, "message": "down"}),
            );
        }
        let node = selected_node(&query);
        let suffix = selector_suffix(node.as_deref());
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(current);
            state
                .requests
                .push(format!("WATCH {path} rv={from}{suffix}"));
            let collection = state.collections.get_mut(key).unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            if from < collection.compacted_below {
                let _ = tx.send(WatchMessage::Event(gone(from)));
            } else {
                for (_, event) in collection
                    .log
                    .iter()
                    .filter(|(rv, event)| *rv > from && on_node(node.as_deref(), &event["object"]))
                {
                    let _ = tx.send(WatchMessage::Event(event.clone()));
                }
                collection.watchers.push(Watcher { node, tx });
            }
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                match rx.recv().await {
                    Some(WatchMessage::Event(event)) => {
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        Some((Ok(Frame::data(Bytes::from(line))), rx))
                    }
                    Some(WatchMessage::Reset) | None => None,
                }
            });
            // A reset ends the stream without the final chunk: hyper closes the connection.
            return Response::builder()
                .header("content-type", "application/json")
                .body(BoxBody::new(StreamBody::new(stream)))
                .unwrap();
        }
        state.requests.push(format!("LIST {path}{suffix}"));
        let items: Vec<Value> = state.collections[key]
            .objects
            .values()
            .filter(|object| on_node(node.as_deref(), object))
            .cloned()
            .collect();
        json_response(
            200,
            json!({
                "kind": "List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": current.to_string()},
                "items": items,
            }),
        )
    }

    /// Applies a change and sends it to the open watches.
    fn change(&self, path: &'static str, kind: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = object_key(&object);
        let collection = state.collections.get_mut(path).unwrap();
        let event_type = match kind {
            "DELETED" => {
                collection.objects.remove(&key);
                "DELETED"
            }
            _ if collection.objects.contains_key(&key) => "MODIFIED",
            _ => "ADDED",
        };
        if event_type != "DELETED" {
            collection.objects.insert(key, object.clone());
        }
        let event = json!({"type": event_type, "object": object});
        collection.log.push((rv, event.clone()));
        collection.watchers.retain(|w| {
            !on_node(w.node.as_deref(), &object)
                || w.tx.send(WatchMessage::Event(event.clone())).is_ok()
        });
    }

    fn apply<T: serde::Serialize>(&self, path: &'static str, object: &T) {
        self.change(path, "APPLY", serde_json::to_value(object).unwrap());
    }

    fn delete<T: serde::Serialize>(&self, path: &'static str, object: &T) {
        self.change(path, "DELETED", serde_json::to_value(object).unwrap());
    }

    /// Deletes without any watch event, as if it happened while nobody watched, and compacts
    /// the log so a resuming watch must relist to learn about it.
    fn delete_unseen_and_compact<T: serde::Serialize>(&self, path: &'static str, object: &T) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        let key = object_key(&serde_json::to_value(object).unwrap());
        let collection = state.collections.get_mut(path).unwrap();
        collection.objects.remove(&key);
        collection.log.clear();
        collection.compacted_below = rv;
    }

    fn bookmark(&self, path: &'static str) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        let event = json!({
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}},
        });
        let collection = state.collections.get_mut(path).unwrap();
        collection
            .watchers
            .retain(|w| w.tx.send(WatchMessage::Event(event.clone())).is_ok());
        rv
    }

    /// Sends 410 Gone on the open watches (what an API server does after compaction).
    fn expire_watches(&self, path: &'static str) {
        let mut state = self.state.lock().unwrap();
        let rv = state.resource_version;
        let collection = state.collections.get_mut(path).unwrap();
        for watcher in collection.watchers.drain(..) {
            let _ = watcher.tx.send(WatchMessage::Event(gone(rv)));
            let _ = watcher.tx.send(WatchMessage::Reset);
        }
    }

    /// Takes the API server down (open watches are cut, every request fails) or back up.
    fn set_outage(&self, down: bool) {
        let mut state = self.state.lock().unwrap();
        state.outage = down;
        for collection in state.collections.values_mut() {
            for watcher in collection.watchers.drain(..) {
                let _ = watcher.tx.send(WatchMessage::Reset);
            }
        }
    }

    fn reset_watches(&self, path: &'static str) {
        let mut state = self.state.lock().unwrap();
        let collection = state.collections.get_mut(path).unwrap();
        for watcher in collection.watchers.drain(..) {
            let _ = watcher.tx.send(WatchMessage::Reset);
        }
    }

    fn requests(&self, prefix: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|r| r.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// A JSON merge patch of an HTTPRoute's status, conditional on the resourceVersion the
    /// patch carries (as the API server does): 409 when it is stale.
    fn patch_status(&self, path: &str, patch: Value) -> Response<BoxBody<Bytes, Infallible>> {
        let key = path
            .strip_prefix("/apis/gateway.networking.k8s.io/v1/namespaces/")
            .and_then(|rest| rest.strip_suffix("/status"))
            .map(|rest| rest.replacen("/httproutes/", "/", 1));
        let current = key.as_ref().and_then(|key| {
            self.state.lock().unwrap().collections[HTTP_ROUTES]
                .objects
                .get(key)
                .cloned()
        });
        let Some(mut object) = current else {
            return json_response(404, json!({"kind": "Status", "code": 404}));
        };
        let wanted = &patch["metadata"]["resourceVersion"];
        let conflict = !wanted.is_null() && *wanted != object["metadata"]["resourceVersion"];
        self.state
            .lock()
            .unwrap()
            .requests
            .push(format!("PATCH {path} {}", if conflict { 409 } else { 200 }));
        if conflict {
            return json_response(
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
            );
        }
        object["status"] = patch["status"].clone();
        self.change(HTTP_ROUTES, "APPLY", object.clone());
        json_response(200, object)
    }

    fn count(&self, request: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.requests.iter().filter(|r| *r == request).count()
    }
}

fn gone(rv: u64) -> Value {
    json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {rv}"),
            "reason": "Expired", "code": 410,
        },
    })
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn json_response(status: u16, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pod(name: &str, node: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(format!("uid-{name}")),
            managed_fields: Some(vec![Default::default()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("web".into()),
            containers: vec![Default::default()],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

/// A watch of `api` for node1, after its initial list, and its change signal.
async fn synced_watch(api: &FakeApiServer) -> (ApiWatch, mpsc::Receiver<()>) {
    let (tx, changes) = mpsc::channel(1);
    let watch = ApiWatch::start(api.client(), "node1", tx);
    watch
        .wait_synced(Duration::from_secs(10))
        .await
        .expect("initial list");
    (watch, changes)
}

/// Waits (10 s at most) for the watch to reach a state where `done` holds.
async fn converge(
    watch: &ApiWatch,
    changes: &mut mpsc::Receiver<()>,
    what: &str,
    done: impl Fn(&ClusterSnapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if done(&watch.snapshot().0) {
            return;
        }
        if tokio::time::timeout_at(deadline, changes.recv())
            .await
            .is_err()
        {
            panic!("{what}: not reached; state {:?}", watch.snapshot().0);
        }
    }
}

/// Polls `done` every 10 ms for 10 s at most.
async fn eventually(done: impl Fn() -> bool) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn pod_names(snapshot: &ClusterSnapshot) -> Vec<&str> {
    snapshot
        .pods
        .keys()
        .map(|(_, name)| name.as_str())
        .collect()
}

#[tokio::test]
async fn watchers_converge_through_events_bookmarks_410_gone_and_resets() {
    let api = FakeApiServer::start().await;
    api.apply(
        NAMESPACES,
        &namespace("shop", &[("nodemesh.io/mesh", "enabled")]),
    );
    api.apply(PODS, &pod("a", "node1", "10.0.1.1"));

    let (watch, mut changes) = synced_watch(&api).await;
    assert_eq!(
        (
            api.count("LIST /api/v1/pods"),
            api.count("LIST /api/v1/pods spec.nodeName=node1")
        ),
        (1, 1),
        "every pod for the workload index, this node's pods field-selected for enrolment"
    );
    let (snapshot, errors) = watch.snapshot();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(pod_names(&snapshot), ["a"]);
    assert!(snapshot.namespaces.contains_key("shop"));
    let a = &snapshot.pods[&("shop".to_owned(), "a".to_owned())];
    assert!(
        a.metadata.managed_fields.is_none() && a.spec.as_ref().unwrap().containers.is_empty(),
        "pods are trimmed to what the mesh reads"
    );
    assert_eq!(a.spec.as_ref().unwrap().node_name.as_deref(), Some("node1"));

    // ADDED, MODIFIED, DELETED.
    api.apply(PODS, &pod("b", "node2", "10.0.2.1"));
    converge(&watch, &mut changes, "ADDED b", |s| {
        pod_names(s) == ["a", "b"]
    })
    .await;
    api.apply(PODS, &pod("b", "node2", "10.0.2.99"));
    converge(&watch, &mut changes, "MODIFIED b", |s| {
        s.pods
            .get(&("shop".to_owned(), "b".to_owned()))
            .and_then(|p| p.status.as_ref()?.pod_ip.clone())
            .as_deref()
            == Some("10.0.2.99")
    })
    .await;
    api.delete(PODS, &pod("b", "node2", "10.0.2.99"));
    converge(&watch, &mut changes, "DELETED b", |s| pod_names(s) == ["a"]).await;

    // A bookmark moves the resume point: after a reset the watch resumes from exactly the
    // bookmark's resourceVersion (it is the last line before the cut), without relisting.
    api.apply(PODS, &pod("c", "node1", "10.0.1.3"));
    converge(&watch, &mut changes, "ADDED c", |s| {
        pod_names(s) == ["a", "c"]
    })
    .await;
    let lists = || {
        (
            api.count("LIST /api/v1/pods"),
            api.count("LIST /api/v1/pods spec.nodeName=node1"),
        )
    };
    let lists_before = lists();
    let bookmark = api.bookmark(PODS);
    api.reset_watches(PODS);
    api.apply(PODS, &pod("d", "node1", "10.0.1.4"));
    converge(&watch, &mut changes, "ADDED d after a reset", |s| {
        pod_names(s) == ["a", "c", "d"]
    })
    .await;
    // Both watches resume from the bookmark (the local one delivered d above; wait for the
    // cluster-wide one's request too).
    let resumed = [
        format!("WATCH /api/v1/pods rv={bookmark}"),
        format!("WATCH /api/v1/pods rv={bookmark} spec.nodeName=node1"),
    ];
    eventually(|| {
        let watches = api.requests("WATCH /api/v1/pods");
        resumed.iter().all(|r| watches.contains(r))
    })
    .await
    .unwrap_or_else(|()| panic!("{:?}", api.requests("WATCH /api/v1/pods")));
    assert_eq!(
        lists(),
        lists_before,
        "a reset resumes the watches without relisting"
    );

    // 410 Gone: the watchers relist, and a deletion they never saw an event for takes effect.
    api.delete_unseen_and_compact(PODS, &pod("c", "node1", "10.0.1.3"));
    api.expire_watches(PODS);
    converge(&watch, &mut changes, "relist after 410", |s| {
        pod_names(s) == ["a", "d"]
    })
    .await;
    eventually(|| lists() == (lists_before.0 + 1, lists_before.1 + 1))
        .await
        .unwrap_or_else(|()| panic!("both watches relist once: {:?}", lists()));

    // A namespace relabelled with an invalid value keeps its last good version.
    api.apply(
        NAMESPACES,
        &namespace(
            "shop",
            &[
                ("nodemesh.io/mesh", "enabled"),
                ("nodemesh.io/peer-authentication", "strikt"),
            ],
        ),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while watch.snapshot().1.is_empty() {
        tokio::time::timeout_at(deadline, changes.recv())
            .await
            .expect("the invalid label is reported");
    }
    let (snapshot, errors) = watch.snapshot();
    assert!(
        errors[0].contains("Namespace shop") && errors[0].contains("strikt"),
        "{errors:?}"
    );
    let labels = snapshot.namespaces["shop"].metadata.labels.clone().unwrap();
    assert!(!labels.contains_key("nodemesh.io/peer-authentication"));
}

#[tokio::test]
async fn a_stop_is_an_uninstall_only_when_the_daemonset_is_gone_or_being_deleted() {
    let api = FakeApiServer::start().await;
    let daemonset = "nodemesh-system/nodemesh-agent";
    let going = || super::daemonset_is_going(api.client(), daemonset);
    assert!(going().await.unwrap(), "deleted (background deletion)");

    let mut object = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "nodemesh-agent", "namespace": "nodemesh-system"},
        "spec": {"selector": {"matchLabels": {"app": "a"}},
                 "template": {"metadata": {"labels": {"app": "a"}},
                              "spec": {"containers": [{"name": "agent", "image": "x"}]}}},
    });
    let put = |object: &Value| {
        api.state
            .lock()
            .unwrap()
            .daemonsets
            .insert(daemonset.to_owned(), object.clone());
    };
    put(&object);
    assert!(!going().await.unwrap(), "present: a restart or an upgrade");
    object["metadata"]["deletionTimestamp"] = json!("2026-11-22T23:00:00Z");
    put(&object);
    assert!(
        going().await.unwrap(),
        "being deleted (foreground deletion)"
    );
}

#[tokio::test]
async fn readiness_waits_for_the_initial_list_of_every_kind() {
    // Nothing listens on this address yet: the list cannot complete.
    let unreachable = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", unreachable.local_addr().unwrap());
    drop(unreachable);
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, _changes) = mpsc::channel(1);
    let watch = ApiWatch::start(client, "node1", tx);
    let error = watch
        .wait_synced(Duration::from_millis(500))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(
            "Namespaces, Pods, this node's Pods, Services, EndpointSlices, AuthorizationPolicies"
        ),
        "{error}"
    );
}

#[tokio::test]
async fn http_routes_and_authorization_policies_are_watched_like_the_rest() {
    let api = FakeApiServer::start().await;
    api.apply(
        AUTHORIZATION_POLICIES,
        &json!({
            "apiVersion": "nodemesh.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-ssh", "namespace": "shop"},
            "spec": {"action": "DENY", "rules": [{"to": [{"ports": [22]}]}]},
        }),
    );
    let (watch, mut changes) = synced_watch(&api).await;
    let (snapshot, _) = watch.snapshot();
    assert_eq!(
        snapshot.authorization_policies[&("shop".into(), "deny-ssh".into())].spec["action"],
        "DENY",
        "policies are part of the initial sync"
    );

    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]},
    });
    api.apply(HTTP_ROUTES, &route);
    converge(&watch, &mut changes, "route added", |s| {
        s.http_routes.contains_key(&("shop".into(), "web".into()))
    })
    .await;
    api.delete(HTTP_ROUTES, &route);
    converge(&watch, &mut changes, "route deleted", |s| {
        s.http_routes.is_empty()
    })
    .await;
}

#[tokio::test]
async fn route_status_is_written_once_and_a_stale_write_is_refused() {
    use crate::state::routes::{CONTROLLER_NAME, status_updates};

    let api = FakeApiServer::start().await;
    api.apply(
        SERVICES,
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"}, "spec": {}}),
    );
    api.apply(
        HTTP_ROUTES,
        &json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "generation": 3},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"backendRefs": [{"name": "web-v2", "port": 80}]}],
            },
        }),
    );
    let (watch, mut changes) = synced_watch(&api).await;
    converge(&watch, &mut changes, "route listed", |s| {
        !s.http_routes.is_empty()
    })
    .await;

    let (snapshot, _) = watch.snapshot();
    let exists = |service: &str| service == "shop/web";
    let updates = status_updates(&snapshot.http_routes, &[], exists, "2026-11-29T00:00:00Z");
    assert_eq!(updates.len(), 1);
    let stale = status_updates(&snapshot.http_routes, &[], exists, "2026-11-29T00:00:00Z");
    watch.write_route_statuses(updates);
    converge(&watch, &mut changes, "status written", |s| {
        s.http_routes.values().any(|r| r.status.is_some())
    })
    .await;
    let (snapshot, _) = watch.snapshot();
    let route = &snapshot.http_routes[&("shop".into(), "web".into())];
    let ours = &route.status.as_ref().unwrap()["parents"][0];
    assert_eq!(ours["controllerName"], CONTROLLER_NAME);
    assert_eq!(ours["conditions"][0]["status"], "True");
    assert_eq!(ours["conditions"][1]["reason"], "BackendNotFound");
    assert_eq!(ours["conditions"][1]["observedGeneration"], 3);
    assert!(
        status_updates(&snapshot.http_routes, &[], exists, "2026-11-30T00:00:00Z").is_empty(),
        "nothing to write once the status is there"
    );

    // Another agent's write computed from the old version is refused, not applied.
    watch.write_route_statuses(stale);
    let path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status";
    eventually(|| api.count(&format!("PATCH {path} 409")) == 1)
        .await
        .expect("the stale write is refused");
    assert_eq!(api.count(&format!("PATCH {path} 200")), 1);
}

#[tokio::test]
async fn an_api_server_outage_keeps_the_last_state_and_catches_up_when_it_ends() {
    let api = FakeApiServer::start().await;
    api.apply(
        NAMESPACES,
        &namespace("shop", &[("nodemesh.io/mesh", "enabled")]),
    );
    api.apply(PODS, &pod("a", "node1", "10.0.1.1"));
    api.apply(PODS, &pod("b", "node1", "10.0.1.2"));
    let (watch, mut changes) = synced_watch(&api).await;
    assert_eq!(pod_names(&watch.snapshot().0), ["a", "b"]);

    // Down: every watch is cut and every retry refused. A pod leaves meanwhile.
    api.set_outage(true);
    api.delete_unseen_and_compact(PODS, &pod("b", "node1", "10.0.1.2"));
    api.apply(PODS, &pod("c", "node1", "10.0.1.3"));
    eventually(|| api.count("REFUSED /api/v1/pods") >= 2)
        .await
        .unwrap_or_else(|()| panic!("the watchers retried: {:?}", api.requests("REFUSED")));
    // What the agent serves with is the last state it knew: nothing is un-enrolled because
    // the API server cannot be reached.
    let (snapshot, _) = watch.snapshot();
    assert_eq!(pod_names(&snapshot), ["a", "b"]);
    assert!(snapshot.namespaces.contains_key("shop"));

    // Up again: the watchers relist (their resume point was compacted) and catch up.
    api.set_outage(false);
    converge(&watch, &mut changes, "caught up after the outage", |s| {
        pod_names(s) == ["a", "c"]
    })
    .await;
}
