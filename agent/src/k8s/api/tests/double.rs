//! The two faults a real API server cannot be made to produce at a chosen moment, against a
//! list/watch test double: an HTTP server on loopback that speaks the list and watch protocol
//! with real Kubernetes JSON (k8s-openapi objects). The real kube-apiserver cuts one watch
//! only when it stops (which cuts every watch and resets its cache, tested in
//! `an_outage_keeps_the_last_state...`), and answers 410 Gone when its watch cache has
//! compacted past the watch's resourceVersion, on its own schedule. The double resets one
//! kind's watches, sends a bookmark, and expires a resourceVersion exactly when told.
//!
//! Like an API server without WatchList, it refuses streaming lists (422), so the watches
//! list it in pages.

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
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Watched, eventually};

const PODS: &str = "/api/v1/pods";

enum WatchMessage {
    Event(Value),
    /// Cut the connection without finishing the chunked body (a reset).
    Reset,
}

/// An open watch, with the node its field selector asks for (if any).
struct Watcher {
    node: Option<String>,
    tx: mpsc::UnboundedSender<WatchMessage>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Pods by `namespace/name`.
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, watch event) for every change, for watches that resume.
    log: Vec<(u64, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    watchers: Vec<Watcher>,
    /// "LIST" or "WATCH rv=<resourceVersion>", each followed by " node=<node>" when
    /// field-selected.
    requests: Vec<String>,
}

#[derive(Clone)]
struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

/// `spec.nodeName=<node>` of a `fieldSelector` query parameter (URL-encoded).
fn selected_node(query: &HashMap<String, String>) -> Option<String> {
    let selector = query.get("fieldSelector")?.replace("%3D", "=");
    selector.strip_prefix("spec.nodeName=").map(str::to_owned)
}

fn on_node(node: Option<&str>, object: &Value) -> bool {
    node.is_none_or(|node| object["spec"]["nodeName"] == node)
}

fn json_response(status: u16, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn gone(rv: u64) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "reason": "Expired", "code": 410, "message": format!("too old resource version: {rv}")}})
}

impl FakeApiServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let handler = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler.serve(&request)) }
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
        request: &Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if query.get("sendInitialEvents").is_some_and(|v| v == "true") {
            return json_response(
                422,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Invalid", "code": 422,
                "message": "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"}),
            );
        }
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        match request.uri().path() {
            PODS => {}
            // Every other kind is empty and quiet; discovery finds no CRDs.
            "/api/v1/namespaces"
            | "/api/v1/services"
            | "/apis/discovery.k8s.io/v1/endpointslices" => {
                if watch {
                    let quiet = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
                    return Response::builder()
                        .header("content-type", "application/json")
                        .body(BoxBody::new(StreamBody::new(quiet)))
                        .unwrap();
                }
                return json_response(
                    200,
                    json!({"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"}, "items": []}),
                );
            }
            _ => return json_response(404, json!({"kind": "Status", "code": 404})),
        }
        let mut state = self.state.lock().unwrap();
        let node = selected_node(&query);
        let suffix = node
            .as_ref()
            .map(|n| format!(" node={n}"))
            .unwrap_or_default();
        if watch {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(state.resource_version);
            state.requests.push(format!("WATCH rv={from}{suffix}"));
            let (tx, rx) = mpsc::unbounded_channel();
            if from < state.compacted_below {
                let _ = tx.send(WatchMessage::Event(gone(from)));
            } else {
                for (_, event) in state
                    .log
                    .iter()
                    .filter(|(rv, event)| *rv > from && on_node(node.as_deref(), &event["object"]))
                {
                    let _ = tx.send(WatchMessage::Event(event.clone()));
                }
                state.watchers.push(Watcher { node, tx });
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
        state.requests.push(format!("LIST{suffix}"));
        let items: Vec<Value> = state
            .objects
            .values()
            .filter(|object| on_node(node.as_deref(), object))
            .cloned()
            .collect();
        json_response(
            200,
            json!({"kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": state.resource_version.to_string()}, "items": items}),
        )
    }

    /// Adds or deletes a pod and sends the event to the open watches.
    fn change(&self, deleted: bool, mut pod: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = format!("shop/{}", pod["metadata"]["name"].as_str().unwrap());
        let kind = if deleted {
            state.objects.remove(&key);
            "DELETED"
        } else {
            state.objects.insert(key, pod.clone());
            "ADDED"
        };
        let event = json!({"type": kind, "object": pod});
        state.log.push((rv, event.clone()));
        state.watchers.retain(|w| {
            !on_node(w.node.as_deref(), &pod)
                || w.tx.send(WatchMessage::Event(event.clone())).is_ok()
        });
    }

    /// A bookmark on every open watch; returns its resourceVersion.
    fn bookmark(&self) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        let event = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                           "metadata": {"resourceVersion": rv.to_string()}}});
        state
            .watchers
            .retain(|w| w.tx.send(WatchMessage::Event(event.clone())).is_ok());
        rv
    }

    /// Cuts every open watch mid-stream.
    fn reset_watches(&self) {
        for watcher in self.state.lock().unwrap().watchers.drain(..) {
            let _ = watcher.tx.send(WatchMessage::Reset);
        }
    }

    /// Deletes a pod without a watch event (as if nobody watched), compacts the log so a
    /// resuming watch must list again to learn of it, and sends 410 Gone on the open watches.
    fn delete_unseen_and_expire(&self, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        state.objects.remove(&format!("shop/{name}"));
        state.log.clear();
        state.compacted_below = rv;
        for watcher in state.watchers.drain(..) {
            let _ = watcher.tx.send(WatchMessage::Event(gone(rv)));
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
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
           "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "app"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

#[tokio::test]
async fn a_reset_resumes_from_the_last_bookmark_and_410_gone_lists_again() {
    let api = FakeApiServer::start().await;
    api.change(false, pod("a", "node1", "10.0.1.1"));
    api.change(false, pod("c", "node1", "10.0.1.3"));
    let agent = Watched::start(api.client(), "node1");
    agent
        .watch
        .wait_synced(Duration::from_secs(10))
        .await
        .expect("synced");
    let local = |agent: &Watched| -> Vec<String> {
        agent.watch.snapshot().0.local_pods.into_keys().collect()
    };
    assert_eq!(local(&agent), ["shop/a", "shop/c"]);
    let lists = || {
        (
            api.requests("LIST").len(),
            api.requests("LIST node=node1").len(),
        )
    };
    assert_eq!(
        lists(),
        (2, 1),
        "paged lists after the refused streaming list"
    );

    // A bookmark moves the resume point: after a reset both pod watches resume from exactly
    // the bookmark's resourceVersion (the last line before the cut), without listing again.
    // (The watches open after the lists complete.)
    eventually("both pod watches open", || api.requests("WATCH").len() == 2).await;
    let bookmark = api.bookmark();
    api.reset_watches();
    api.change(false, pod("d", "node1", "10.0.1.4"));
    eventually("d after the reset", || {
        local(&agent) == ["shop/a", "shop/c", "shop/d"]
    })
    .await;
    let resumed = [
        format!("WATCH rv={bookmark}"),
        format!("WATCH rv={bookmark} node=node1"),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !resumed.iter().all(|r| api.requests("WATCH").contains(r)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both watches resume from the bookmark {bookmark}: {:?}",
            api.requests("WATCH")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lists(), (2, 1), "a reset resumes without listing");

    // 410 Gone: both watches list again, and a deletion they never saw an event for counts.
    api.delete_unseen_and_expire("c");
    eventually("c gone after the relist", || {
        local(&agent) == ["shop/a", "shop/d"]
    })
    .await;
    eventually("the workload index relisted too", || {
        agent.indices.workloads.read().unwrap().len() == 2
    })
    .await;
    eventually("both listed once more", || lists() == (4, 2)).await;
}
