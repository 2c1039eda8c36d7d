//! The scale bench's cluster: Namespaces, ServiceAccounts, Pods (with the status a kubelet
//! writes), Services and EndpointSlices shaped like a real cluster's (managed fields, owner
//! references, containers with env, resources and probes, full status), written to the real
//! API server with many requests in flight, and pod churn at a fixed rate.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use nodemesh_testbed::{Result, TestbedError};
use serde_json::{Value, json};

/// Namespaces the Services (and their pods) are spread over.
pub const NAMESPACES: usize = 50;
/// ServiceAccounts per namespace.
const SERVICE_ACCOUNTS: usize = 10;
const FIELD_MANAGER: &str = "nodemesh-scale";

/// How the cluster is laid out: pod `i` belongs to Service `i / pods_per_service`, runs on
/// node `i % nodes` (never the bench's node), and has address 10.x.y.z from `i`.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub pods_per_service: usize,
    pub nodes: usize,
}

impl Layout {
    fn namespace(service: usize) -> String {
        format!("scale-{}", service % NAMESPACES)
    }

    fn pod_name(&self, pod: usize) -> String {
        format!("svc-{}-7d9f8b6c5-{pod:06}", pod / self.pods_per_service)
    }

    fn pod_ip(pod: usize) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 | u32::try_from(pod).unwrap_or(0) & 0x00ff_ffff)
    }
}

fn api_error(what: String) -> impl FnOnce(kube::Error) -> TestbedError {
    move |source| TestbedError::Kube { what, source }
}

/// Creates the namespaces (all meshed) and their ServiceAccounts.
pub async fn namespaces(client: Client) -> Result<()> {
    for n in 0..NAMESPACES {
        let name = format!("scale-{n}");
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": {"nodemesh.io/mesh": "enabled"}}});
        apply(&client, "v1", "Namespace", "namespaces", None, &name, &ns).await?;
        for a in 0..SERVICE_ACCOUNTS {
            let account = format!("sa-{a}");
            let object = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                                "metadata": {"name": account, "namespace": name}});
            apply(
                &client,
                "v1",
                "ServiceAccount",
                "serviceaccounts",
                Some(&name),
                &account,
                &object,
            )
            .await?;
        }
    }
    Ok(())
}

async fn apply(
    client: &Client,
    api_version: &str,
    kind: &str,
    plural: &str,
    namespace: Option<&str>,
    name: &str,
    object: &Value,
) -> Result<()> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let api = match namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource),
        None => Api::<DynamicObject>::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_error(format!("applying {kind} {name}")))?;
    Ok(())
}

/// A pod as a Deployment's ReplicaSet creates it.
fn pod(layout: &Layout, index: usize) -> Value {
    let service = index / layout.pods_per_service;
    let app = format!("svc-{service}");
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": layout.pod_name(index), "namespace": Layout::namespace(service),
            "labels": {"app.kubernetes.io/name": app, "app.kubernetes.io/version": "2.4.1",
                       "pod-template-hash": "7d9f8b6c5", "team": format!("team-{}", service % 20)},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-7d9f8b6c5"), "uid": format!("00000000-0000-4000-8000-{service:012}"),
                "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": format!("node-{}", index % layout.nodes),
            "serviceAccountName": format!("sa-{}", service % SERVICE_ACCOUNTS),
            "containers": [{
                "name": "app", "image": format!("registry.example/shop/{app}:2.4.1"),
                "args": ["--listen=:8080", "--metrics=:9090"],
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
                "env": [{"name": "DATABASE_URL", "value": "postgres://orders.shop.svc:5432/orders"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10},
            }],
        },
    })
}

/// The status a kubelet writes once the pod runs.
fn pod_status(index: usize) -> Value {
    let ip = Layout::pod_ip(index).to_string();
    let started = "2026-11-20T10:00:01Z";
    json!({"status": {
        "phase": "Running", "hostIP": "10.250.0.1", "hostIPs": [{"ip": "10.250.0.1"}],
        "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "Burstable", "startTime": started,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": started},
            {"type": "Ready", "status": "True", "lastTransitionTime": started},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": started},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
        ],
        "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
            "image": "registry.example/shop/app:2.4.1",
            "imageID": "registry.example/shop/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "containerID": format!("containerd://{index:064x}"),
            "state": {"running": {"startedAt": started}}}],
    }})
}

async fn create_pod(client: &Client, layout: &Layout, index: usize) -> Result<()> {
    let object = pod(layout, index);
    let namespace = Layout::namespace(index / layout.pods_per_service);
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
    );
    let name = layout.pod_name(index);
    let pod: DynamicObject = serde_json::from_value(object)
        .map_err(|e| TestbedError::Other(format!("pod object: {e}")))?;
    api.create(&PostParams::default(), &pod)
        .await
        .map_err(api_error(format!("creating pod {name}")))?;
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(pod_status(index)),
    )
    .await
    .map_err(api_error(format!("writing the status of pod {name}")))?;
    Ok(())
}

/// Creates pods `from..to` with `concurrency` requests in flight; prints progress.
pub async fn pods(
    client: Client,
    layout: Layout,
    from: usize,
    to: usize,
    concurrency: usize,
) -> Result<()> {
    in_flight(from..to, concurrency, "pods", |index| {
        let client = client.clone();
        async move { create_pod(&client, &layout, index).await }
    })
    .await
}

/// Creates Services `from..to`, each with one EndpointSlice listing its pods as ready.
pub async fn services(
    client: Client,
    layout: Layout,
    from: usize,
    to: usize,
    concurrency: usize,
) -> Result<()> {
    in_flight(from..to, concurrency, "Services", |service| {
        let client = client.clone();
        async move { create_service(&client, &layout, service).await }
    })
    .await
}

/// Runs `write` for every index of `range`, `concurrency` at a time; prints progress.
async fn in_flight<F>(
    range: std::ops::Range<usize>,
    concurrency: usize,
    what: &str,
    write: impl Fn(usize) -> F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    let done = AtomicU64::new(0);
    let results = stream::iter(range)
        .map(|index| {
            let (done, written) = (&done, write(index));
            async move {
                let result = written.await;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 10_000 == 0 {
                    let rate = n as f64 / started.elapsed().as_secs_f64();
                    eprintln!("scale: {n} {what} written ({rate:.0}/s)");
                }
                result
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

async fn create_service(client: &Client, layout: &Layout, service: usize) -> Result<()> {
    let namespace = Layout::namespace(service);
    let name = format!("svc-{service}");
    let object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": name}},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}]},
    });
    apply(
        client,
        "v1",
        "Service",
        "services",
        Some(&namespace),
        &name,
        &object,
    )
    .await?;
    let pods = service * layout.pods_per_service..(service + 1) * layout.pods_per_service;
    let endpoints: Vec<Value> = pods
        .map(|pod| {
            json!({
                "addresses": [Layout::pod_ip(pod).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", pod % layout.nodes),
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": layout.pod_name(pod)},
            })
        })
        .collect();
    let slice_name = format!("{name}-abcde");
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": name,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        "endpoints": endpoints,
    });
    apply(
        client,
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        Some(&namespace),
        &slice_name,
        &slice,
    )
    .await
}

/// Pod churn at `rate` events/s for `duration`: pods created (one event), given a status
/// (one event) and deleted (one event), as a rollout does. Returns the events caused.
pub async fn churn(
    client: Client,
    layout: Layout,
    first_new: usize,
    rate: u64,
    duration: Duration,
) -> Result<u64> {
    let events = Arc::new(AtomicU64::new(0));
    // Each cycle is three events: create, status, and the deletion of a pod created about a
    // second before (a pod still being written is not deleted under its writer).
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(3.0 / rate as f64));
    let deadline = Instant::now() + duration;
    let mut cycle = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let index = first_new + cycle;
        let (client, events) = (client.clone(), Arc::clone(&events));
        let lag = usize::try_from(rate / 3).unwrap_or(1).max(2);
        tasks.spawn(async move {
            create_pod(&client, &layout, index).await?;
            events.fetch_add(2, Ordering::Relaxed);
            if let Some(old) = index.checked_sub(lag).filter(|old| *old >= first_new) {
                let namespace = Layout::namespace(old / layout.pods_per_service);
                let deleted =
                    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client, &namespace)
                        .delete(
                            &layout.pod_name(old),
                            &DeleteParams::default().grace_period(0),
                        )
                        .await;
                match deleted {
                    Ok(_) => {
                        events.fetch_add(1, Ordering::Relaxed);
                    }
                    // Its creation was still in flight: it is deleted by nobody, which is fine.
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(source) => {
                        return Err(api_error(format!("deleting pod {}", layout.pod_name(old)))(
                            source,
                        ));
                    }
                }
            }
            Ok::<_, TestbedError>(())
        });
        cycle += 1;
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| TestbedError::Other(format!("churn task: {e}")))??;
    }
    Ok(events.load(Ordering::Relaxed))
}
