//! Admin HTTP server: health, readiness, config dump and connection stats as JSON.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use serde::Serialize;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    datapath::Datapath,
    identity::manager::{IdentityManager, IdentityView},
    k8s::status::{SourceStatus, WatchView},
    proxy::outbound::balance::{Balancer, EndpointView},
    serving::{BoundedServer, Limits},
    state::{
        authorization::PolicyView,
        node::{EnrolledPodView, NodeStateWatch, PendingPodView},
        routes::RouteView,
        services::{ServicePortView, SharedServices},
        workloads::SharedWorkloads,
    },
    telemetry::{
        connections::ConnectionStats,
        metrics::{Exposition, Metrics},
    },
};

/// What the admin server shows, updated by the agent as things change.
pub struct AdminState {
    pub node_name: String,
    pub fail_mode: &'static str,
    pub ready: AtomicBool,
    /// The node's state: enrolled and pending pods, HTTPRoutes and AuthorizationPolicies in
    /// force, what was rejected (all of one version).
    pub state: NodeStateWatch,
    /// The cluster-wide indices the source keeps current.
    pub workloads: SharedWorkloads,
    pub services: SharedServices,
    pub source_status: Arc<SourceStatus>,
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<Metrics>,
    pub identities: Option<Arc<IdentityManager>>,
    pub stats: Arc<ConnectionStats>,
    pub datapath: Arc<Datapath>,
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    ready: bool,
    fail_mode: &'a str,
    attach_point: String,
    enrolled_pods: Vec<EnrolledPodView>,
    pending_pods: Vec<PendingPodView>,
    config_errors: Vec<String>,
    /// Where the cluster state comes from: each watch's state, and what the indices hold.
    cluster_state: ClusterStateView,
    /// Service virtual addresses the proxy resolves, with their ready endpoints.
    services: Vec<ServicePortView>,
    /// HTTPRoutes and GRPCRoutes in force (the last good version of a rejected one).
    routes: Vec<RouteView>,
    /// Endpoints the L7 proxy has sent requests to: latency estimate, load, ejection.
    http_endpoints: Vec<EndpointView>,
    /// This node's zone and the Service ports whose requests spill out of it now.
    zones: ZonesView,
    /// AuthorizationPolicies in force and the local pods each selects.
    authorization_policies: Vec<PolicyView>,
    /// Workload certificates held by this node; null when the agent runs without a CA.
    identities: Option<Vec<IdentityView>>,
    datapath_maps: crate::datapath::MapOccupancy,
}

#[derive(Serialize)]
struct ClusterStateView {
    watches: Vec<WatchView>,
    /// Pods indexed cluster-wide (those that can own a meshed address).
    pods_indexed: usize,
    services: usize,
    virtual_ports: usize,
    ready_endpoints: usize,
}

impl ClusterStateView {
    fn of(state: &AdminState) -> Self {
        let pods_indexed = state
            .workloads
            .read()
            .map_or_else(|p| p.into_inner().len(), |w| w.len());
        let (services, virtual_ports, ready_endpoints) = state
            .services
            .read()
            .map_or_else(|p| p.into_inner().counts(), |s| s.counts());
        Self {
            watches: state.source_status.views(),
            pods_indexed,
            services,
            virtual_ports,
            ready_endpoints,
        }
    }
}

/// Zone-aware balancing as the config dump shows it (each Service port's preference and
/// policy are in `services`).
#[derive(serde::Serialize)]
struct ZonesView {
    local_zone: Option<String>,
    local_region: Option<String>,
    /// Each zone some Node is labelled with, and its region.
    zone_regions: BTreeMap<String, String>,
    /// Service ports (`namespace/name:port`) whose requests spill beyond their preferred
    /// endpoints now.
    spilling: Vec<String>,
}

impl ZonesView {
    fn of(state: &AdminState) -> Self {
        let services = state.services.read().unwrap_or_else(|p| p.into_inner());
        let topology = services.topology();
        Self {
            local_zone: topology.zone.as_deref().map(str::to_owned),
            local_region: topology.region.as_deref().map(str::to_owned),
            zone_regions: (topology.zone_regions.iter())
                .map(|(zone, region)| (zone.to_string(), region.to_string()))
                .collect(),
            spilling: services.spilling(),
        }
    }
}

fn service_views(state: &AdminState) -> Vec<ServicePortView> {
    state
        .services
        .read()
        .map_or_else(|p| p.into_inner().views(), |s| s.views())
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// Everything: health, readiness, config dump, metrics, stats (on loopback).
    All,
    /// `/metrics` only, for a listener Prometheus can reach from outside the node.
    MetricsOnly,
}

/// The agent's admin listeners (the admin address, and the metrics address if any), each
/// bound for the agent alone.
#[derive(Default)]
pub struct Listeners(Vec<JoinHandle<()>>);

#[derive(Debug, thiserror::Error)]
#[error("binding the {what} to {addr}: {source}")]
pub struct BindError {
    what: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// How often a port still held by the previous agent is tried again.
const PORT_RETRY: Duration = Duration::from_millis(20);

impl Listeners {
    /// Binds every address and serves its endpoints in the background until `close`. A port
    /// in use is tried again for `wait` (a predecessor closing its own), then fails.
    pub async fn open(
        addresses: &[(SocketAddr, Endpoints)],
        state: &Arc<AdminState>,
        wait: Duration,
    ) -> Result<Self, BindError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut listeners = Listeners::default();
        for &(addr, endpoints) in addresses {
            let what = match endpoints {
                Endpoints::All => "admin server",
                Endpoints::MetricsOnly => "metrics listener",
            };
            let listener = loop {
                match bind_exclusive(addr) {
                    Ok(listener) => break listener,
                    Err(error)
                        if error.kind() == std::io::ErrorKind::AddrInUse
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(PORT_RETRY).await;
                    }
                    Err(source) => {
                        listeners.close().await;
                        return Err(BindError { what, addr, source });
                    }
                }
            };
            tracing::info!(%addr, ?endpoints, "admin server listening");
            listeners
                .0
                .push(start(listener, Arc::clone(state), endpoints));
        }
        Ok(listeners)
    }

    /// Stops accepting and closes the listening sockets (the port is free when this returns);
    /// requests in flight finish.
    pub async fn close(&mut self) {
        for server in self.0.drain(..) {
            server.abort();
            // The aborted task has dropped its listener once it is joined.
            let _ = server.await;
        }
    }
}

/// The admin API on the node's loopback: the kubelet's probes and `nodemesh status`/`top`,
/// all from one source address.
const ADMIN_LIMITS: Limits = Limits {
    max_connections: 256,
    max_connections_per_source: 256,
    handshake_timeout: Duration::from_secs(10),
    header_read_timeout: Duration::from_secs(10),
    max_lifetime: Duration::from_secs(60),
};

/// `/metrics` on the node's address, which any pod can reach: a few scrapers, each with
/// a connection or two (docs/security.md).
const METRICS_LIMITS: Limits = Limits {
    max_connections: 64,
    max_connections_per_source: 8,
    ..ADMIN_LIMITS
};

/// Serves `endpoints` on `listener` in the background until the returned task is aborted,
/// within the bounds of `serving`.
fn start(listener: TcpListener, state: Arc<AdminState>, endpoints: Endpoints) -> JoinHandle<()> {
    let (name, limits) = match endpoints {
        Endpoints::All => ("admin", ADMIN_LIMITS),
        Endpoints::MetricsOnly => ("metrics", METRICS_LIMITS),
    };
    let server = BoundedServer::new(name, limits, None);
    tokio::spawn(server.serve(listener, move |_peer| {
        let state = Arc::clone(&state);
        service_fn(move |request| {
            let state = Arc::clone(&state);
            async move {
                let response = match endpoints {
                    Endpoints::MetricsOnly if request.uri().path() != "/metrics" => {
                        text(StatusCode::NOT_FOUND, "only /metrics here\n")
                    }
                    _ => route(&request, &state),
                };
                Ok::<_, Infallible>(response)
            }
        })
    }))
}

/// Without SO_REUSEPORT: no other process, root included, can bind the port next to the
/// agent and take a share of its connections. (SO_REUSEADDR only lets a restarted agent
/// bind while connections of the old one linger in TIME_WAIT.) During a surge upgrade the
/// successor binds once the old agent has closed its listeners (docs/lifecycle.md).
fn bind_exclusive(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

fn route(request: &Request<hyper::body::Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) && certificates_held(state) => {
            // The pid tells which agent answered: during a surge upgrade the port passes from
            // the old agent to the new one.
            text(
                StatusCode::OK,
                format!("ready pid={}\n", std::process::id()),
            )
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/config_dump" => config_dump(state),
        "/metrics" => metrics(state, exposition(request)),
        "/stats" => json(&serde_json::json!({
            "connections": state.stats.snapshot(),
            "inbound_plaintext": state.stats.plaintext(),
            "protocol_detection": state.stats.detection(),
        })),
        "/allocations" => match crate::telemetry::allocations::counted() {
            Some(counts) => json(&counts),
            None => text(
                StatusCode::NOT_FOUND,
                "this agent does not count allocations (built without the feature \
                 count-allocations)\n",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown path; try /healthz /readyz /config_dump /metrics /stats\n",
        ),
    }
}

/// Every identity of the node's pods has a valid certificate (true without a CA).
pub fn certificates_held(state: &AdminState) -> bool {
    state.identities.as_ref().is_none_or(|m| m.all_held())
}

/// The config dump, with the node's state of one version.
fn config_dump(state: &AdminState) -> Response<Full<Bytes>> {
    let node = Arc::clone(&state.state.borrow());
    json(&ConfigDump {
        node: &state.node_name,
        ready: state.ready.load(Ordering::Acquire),
        fail_mode: state.fail_mode,
        attach_point: state.datapath.attach_point().display().to_string(),
        enrolled_pods: node.enrolled.clone(),
        pending_pods: node.pending.clone(),
        config_errors: node.config_errors.clone(),
        cluster_state: ClusterStateView::of(state),
        services: service_views(state),
        routes: node.routes.views(),
        http_endpoints: state.balancer.views(),
        zones: ZonesView::of(state),
        authorization_policies: node.authorization.views(),
        identities: state.identities.as_ref().map(|m| m.views()),
        datapath_maps: state.datapath.occupancy(),
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// The metrics format the scraper's `Accept` header asks for.
pub fn exposition(request: &Request<hyper::body::Incoming>) -> Exposition {
    Exposition::negotiate(
        request
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Prometheus text, with the agent's own gauges brought up to date first.
fn metrics(state: &AdminState, format: Exposition) -> Response<Full<Bytes>> {
    let node = Arc::clone(&state.state.borrow());
    let enrolled = node.enrolled.len();
    let maps: Vec<(String, u64)> = match serde_json::to_value(state.datapath.occupancy()) {
        Ok(serde_json::Value::Object(maps)) => maps
            .into_iter()
            .filter_map(|(name, entries)| Some((name, entries.as_u64()?)))
            .collect(),
        _ => Vec::new(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let expiry: Vec<(String, i64)> = state
        .identities
        .as_ref()
        .map(|m| m.views())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|view| {
            let not_after = view.not_after_unix? as i64;
            Some((view.spiffe_id.to_string(), not_after - now))
        })
        .collect();
    let errors = node.config_errors.len();
    state
        .metrics
        .set_agent_state(enrolled, &maps, &expiry, errors);
    state.metrics.set_pending_pods(node.pending.len());
    let mut response = Response::new(Full::new(Bytes::from(state.metrics.encode(format))));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    response
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "serialisation failed\n"),
    }
}
