//! HBONE server: the listener on port 15008 inside each meshed pod's network namespace.
//! It terminates mTLS with that pod's certificate, requires a client certificate from the
//! mesh's trust bundle and trust domain, and serves HTTP/2 CONNECT streams whose authority is
//! one of this pod's own addresses, delivering each to the application from inside the pod.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use super::{
    delivery::connect_to_application,
    hbone::{HBONE_SERVER_MAX_STREAMS, connect::connect_target},
    http::authorize::{self, Check, Source},
    limits::{self, Budget, PerClient},
    listener::{accept_loop, canonical},
    relay::{relay_until, reset},
    revocation::withdrawn,
};
use crate::{
    datapath::Datapath,
    identity::{manager::IdentityManager, spiffe::SpiffeId, tls},
    lifecycle::drain,
    netns::NetnsSockets,
    pods::routing::SourcePreservation,
    state::workloads::SharedWorkloads,
    state::{
        authorization::{
            AuthorizationIndex, Decision, PodPolicies, Policy, RequestAttributes, decide,
        },
        membership::PeerAuthentication,
        probes::{ProbeIndex, ProbePort},
    },
    telemetry::{
        access::AccessLog,
        connections::ConnectionStats,
        metrics::{Metrics, Peer, Reporter, Traffic, UNKNOWN},
        report::ConnectionReport,
    },
};

/// What every inbound handler needs, shared by the node.
pub struct InboundContext {
    pub identities: Arc<IdentityManager>,
    pub roots: Arc<RootCertStore>,
    pub trust_domain: String,
    pub stats: Arc<ConnectionStats>,
    pub proxy_mark: u32,
    pub transparent_mark: u32,
    /// The node's /proc/sys/net as the agent can write it (pods' sysctls are set through it).
    pub proc_sys_net: PathBuf,
    pub connect_timeout: Duration,
    pub datapath: Arc<Datapath>,
    /// The node's own addresses: the kubelet probes from them.
    pub node_addresses: Vec<IpAddr>,
    /// AuthorizationPolicies by local pod, replaced on every change in the cluster; watched
    /// by the connections they were decided for.
    pub authorization: watch::Sender<Arc<AuthorizationIndex>>,
    /// The kubelet's probes of each local pod, replaced with the cluster state.
    pub probes: RwLock<Arc<ProbeIndex>>,
    /// How long a stream that authorization must parse may take to show it is HTTP.
    pub detect_wait: Duration,
    pub workloads: SharedWorkloads,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
}

impl InboundContext {
    /// The client of a connection from `ip`: its workload when it is a meshed pod, and the
    /// principal it proved (`verified`), or `unknown` for plaintext.
    pub fn source_peer(&self, ip: IpAddr, verified: Option<&SpiffeId>) -> Peer {
        let known = self
            .workloads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .peer_of(canonical(ip));
        match verified {
            Some(id) => Peer {
                workload: known.workload,
                namespace: id.namespace().to_owned(),
                principal: id.to_string(),
            },
            None => Peer {
                principal: UNKNOWN.to_owned(),
                ..known
            },
        }
    }

    /// The AuthorizationPolicies of `pod`, as they are now and as they change.
    pub fn policies(&self, pod: &DestinationPod) -> PodPolicies {
        PodPolicies::new(self.authorization.subscribe(), &pod.display_name)
    }

    /// What the kubelet's probes of `pod` do on `port`, if any use it.
    pub fn probe_port(&self, pod: &DestinationPod, port: u16) -> Option<ProbePort> {
        self.probes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .port(&pod.display_name, port)
    }
}

/// One meshed pod as its inbound listeners (HBONE and plaintext) see it.
pub struct DestinationPod {
    pub display_name: String,
    /// Who it is, for metrics and access logs.
    pub peer: Peer,
    pub identity: SpiffeId,
    /// Its addresses from the API server: what an HBONE CONNECT may name.
    pub ips: Vec<IpAddr>,
    /// Every address whose plaintext is captured for it: `ips` and the other non-loopback
    /// addresses of its network namespace (IPv6 link-local, secondary interfaces).
    pub inbound_addresses: Vec<IpAddr>,
    pub sockets: Arc<NetnsSockets>,
    /// Which families can be delivered with the client's address.
    pub source_preservation: SourcePreservation,
    /// The namespace's mode; changes in place when the namespace is relabelled, and
    /// plaintext connections watch it.
    mode: watch::Sender<PeerAuthentication>,
    /// Plaintext connections to it through the proxy at once, per client address and in all.
    pub plaintext_connections: Arc<PerClient<IpAddr>>,
    /// Connections from the node to its kubelet probe ports, apart from other plaintext so
    /// that no outsider holding the plaintext bound can get its probes reset.
    pub probe_connections: Arc<Budget>,
    /// HBONE tunnels to it at once, per peer identity.
    pub tunnels: Arc<PerClient<SpiffeId>>,
    /// TLS handshakes in progress at its HBONE listener.
    pub handshakes: Arc<PerClient>,
}

impl DestinationPod {
    pub fn new(
        display_name: String,
        peer: Peer,
        identity: SpiffeId,
        ips: Vec<IpAddr>,
        sockets: Arc<NetnsSockets>,
        source_preservation: SourcePreservation,
        mode: PeerAuthentication,
    ) -> Self {
        Self {
            display_name,
            peer,
            identity,
            inbound_addresses: ips.clone(),
            ips,
            sockets,
            source_preservation,
            mode: watch::Sender::new(mode),
            plaintext_connections: PerClient::new(
                "pod_plaintext_connections",
                usize::MAX,
                usize::MAX,
            ),
            probe_connections: Budget::new("pod_probe_connections", limits::MAX_PROBE_CONNECTIONS),
            tunnels: PerClient::new("pod_tunnels_per_peer", usize::MAX, usize::MAX),
            handshakes: PerClient::new(
                "pod_pending_handshakes",
                limits::MAX_PENDING_HANDSHAKES_PER_CLIENT,
                limits::MAX_PENDING_HANDSHAKES,
            ),
        }
    }

    /// Bounds the plaintext connections to this pod through the proxy at once (one client
    /// address may hold a share of them), and the HBONE tunnels of each peer identity.
    pub fn with_connection_limit(mut self, limit: usize) -> Self {
        self.plaintext_connections = PerClient::new(
            "pod_plaintext_connections",
            limits::per_client_share(limit),
            limit,
        );
        self.tunnels = PerClient::new("pod_tunnels_per_peer", limit, usize::MAX);
        self
    }

    /// Captures plaintext to these addresses of its network namespace too.
    pub fn with_inbound_addresses(mut self, addresses: Vec<IpAddr>) -> Self {
        self.inbound_addresses = addresses;
        self
    }

    pub fn peer_authentication(&self) -> PeerAuthentication {
        *self.mode.borrow()
    }

    pub fn set_peer_authentication(&self, mode: PeerAuthentication) {
        self.mode.send_if_modified(|current| {
            let changed = *current != mode;
            *current = mode;
            changed
        });
    }

    /// Follows the namespace's mode as it changes.
    pub fn watch_peer_authentication(&self) -> watch::Receiver<PeerAuthentication> {
        self.mode.subscribe()
    }
}

pub async fn serve(listener: TcpListener, pod: Arc<DestinationPod>, ctx: Arc<InboundContext>) {
    let name = pod.display_name.clone();
    accept_loop(listener, "HBONE", &name, |stream, peer| {
        let (pod, ctx) = (Arc::clone(&pod), Arc::clone(&ctx));
        serve_connection(stream, peer, pod, ctx)
    })
    .await
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
) {
    // Small HTTP/2 frames (a CONNECT's 200, a short reply) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let Some(handshake) = pod.handshakes.try_acquire(&peer.ip()) else {
        limits::refuse(
            &stream,
            pod.handshakes.budget(),
            &pod.display_name,
            &ctx.metrics,
        );
        return;
    };
    let Some(certificate) = ctx.identities.certificate(&pod.identity) else {
        tracing::warn!(pod = %pod.display_name, %peer, "HBONE refused: this pod holds no valid certificate (none issued yet, or expired without renewal: is the CA reachable?)");
        return;
    };
    let config = match certificate
        .tls_material()
        .and_then(|(chain, key)| tls::hbone_server_config(chain, key, Arc::clone(&ctx.roots)))
    {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(pod = %pod.display_name, %error, "HBONE TLS configuration");
            return;
        }
    };
    let accept = TlsAcceptor::from(Arc::new(config)).accept(stream);
    let tls = match tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // No client certificate, another CA, expired, garbage: all end here.
            tracing::warn!(pod = %pod.display_name, %peer, %error, "HBONE mTLS handshake rejected");
            return;
        }
        Err(_) => {
            tracing::warn!(pod = %pod.display_name, %peer, timeout = ?limits::HANDSHAKE_TIMEOUT, "HBONE mTLS handshake not completed in time; closed");
            return;
        }
    };
    drop(handshake);
    let peer_id = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(tls::spiffe_id_of)
    {
        Some(Ok(id)) if id.trust_domain() == ctx.trust_domain => id,
        Some(Ok(id)) => {
            tracing::warn!(pod = %pod.display_name, %peer, peer_id = %id, "HBONE rejected: peer from another trust domain");
            return;
        }
        Some(Err(error)) => {
            tracing::warn!(pod = %pod.display_name, %peer, %error, "HBONE rejected: peer certificate has no usable SPIFFE ID");
            return;
        }
        None => return,
    };
    let service = service_fn(move |request| {
        let (pod, ctx, peer_id) = (Arc::clone(&pod), Arc::clone(&ctx), peer_id.clone());
        async move { Ok::<_, Infallible>(handle_connect(request, pod, ctx, peer_id, peer).await) }
    });
    // Draining sends GOAWAY: source nodes open their next tunnels to the successor, and
    // this connection ends when its last tunnel does.
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(HBONE_SERVER_MAX_STREAMS)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(error) = drain::serve_until_drained(connection, |c| c.graceful_shutdown()).await {
        tracing::debug!(%peer, %error, "HBONE connection ended");
    }
}

async fn handle_connect(
    request: Request<hyper::body::Incoming>,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
    peer_id: SpiffeId,
    peer: SocketAddr,
) -> Response<Empty<Bytes>> {
    if request.method() != Method::CONNECT {
        tracing::warn!(pod = %pod.display_name, %peer_id, method = %request.method(), "HBONE: only CONNECT is served");
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = connect_target(request.uri()) else {
        tracing::warn!(pod = %pod.display_name, %peer_id, uri = %request.uri(), "HBONE: CONNECT authority is not ip:port");
        return status(StatusCode::BAD_REQUEST);
    };
    if !pod.ips.contains(&target.ip()) {
        tracing::warn!(pod = %pod.display_name, %peer_id, %target, "HBONE: CONNECT to an address that is not this meshed pod");
        return status(StatusCode::FORBIDDEN);
    }
    let policies = ctx.policies(&pod);
    let port = target.port();
    let in_force = policies.current();
    let inspects_http = in_force.iter().any(|p| p.inspects_http(port));
    let decide_tunnel = {
        let peer_id = peer_id.clone();
        move |current: &[Arc<Policy>]| {
            let attributes = RequestAttributes {
                source: Some(&peer_id),
                port,
                http: None,
            };
            decide(current, &attributes)
        }
    };
    if !inspects_http && let Decision::Deny(by) = decide_tunnel(&in_force) {
        tracing::warn!(pod = %pod.display_name, %peer_id, %target, policy = %by, "authorization: connection denied");
        return status(StatusCode::FORBIDDEN);
    }
    let Some(tunnel) = pod.tunnels.try_acquire(&peer_id) else {
        ctx.metrics
            .refused(pod.tunnels.budget().reason, &pod.display_name);
        if pod.tunnels.budget().log_refusal() {
            tracing::warn!(pod = %pod.display_name, %peer_id, limit = pod.tunnels.limit_per_client(), "HBONE tunnel refused: the peer identity is at its bound for this pod (logged at most every 10 s)");
        }
        return status(StatusCode::SERVICE_UNAVAILABLE);
    };
    let upstream = match connect_to_application(&pod, &ctx, target, Some(peer.ip())).await {
        Ok((upstream, _)) => upstream,
        Err(error) => {
            tracing::info!(pod = %pod.display_name, %peer_id, %target, %error, "HBONE: the application did not accept");
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let source = peer_id.to_string();
    ctx.stats.opened(&source, target);
    let traffic = Traffic {
        reporter: Reporter::Destination,
        source: ctx.source_peer(peer.ip(), Some(&peer_id)),
        destination: pod.peer.clone(),
        destination_service: UNKNOWN.to_owned(),
        mutual_tls: true,
    };
    tokio::spawn(async move {
        let _tunnel = tunnel;
        let (sent, received) = match hyper::upgrade::on(request).await {
            Ok(upgraded) if inspects_http => {
                let check = Check {
                    pod: pod.display_name.clone(),
                    policies,
                    source: Source::Mesh(peer_id),
                    port,
                    detect_wait: ctx.detect_wait,
                    traffic,
                    metrics: Arc::clone(&ctx.metrics),
                    access_log: ctx.access_log,
                };
                authorize::serve(TokioIo::new(upgraded), upstream, check).await
            }
            Ok(upgraded) => {
                let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
                let name = pod.display_name.clone();
                let withdrawal = async {
                    let by = withdrawn(policies, None, decide_tunnel).await;
                    tracing::warn!(pod = %name, %peer_id, %target, policy = %by, "authorization withdrawn by a policy change: tunnel reset");
                };
                let (sent, received) = relay_until(
                    TokioIo::new(upgraded),
                    upstream,
                    |_, app| reset(app),
                    withdrawal,
                )
                .await;
                report.close(sent, received);
                (sent, received)
            }
            Err(error) => {
                tracing::info!(%peer, %error, "HBONE upgrade failed");
                (0, 0)
            }
        };
        ctx.stats.closed(&source, target, sent, received);
    });
    status(StatusCode::OK)
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}
