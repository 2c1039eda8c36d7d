//! HBONE server: the listener on port 15008 inside each meshed pod's network namespace.
//! It terminates mTLS with that pod's certificate, requires a client certificate from the
//! mesh's trust bundle and trust domain, and serves HTTP/2 CONNECT streams whose authority is
//! one of this pod's own addresses, delivering each to the application from inside the pod.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    delivery::connect_to_application,
    hbone::HBONE_SERVER_MAX_STREAMS,
    http::authorize::{self, Check},
    limits::{self, Budget, PerClient},
    listener::accept_loop,
    relay::{relay, reset},
};
use crate::{
    datapath::Datapath,
    identity::{manager::IdentityManager, spiffe::SpiffeId, tls},
    lifecycle::drain,
    pods::{netns::NetnsSockets, routing::SourcePreservation},
    state::workloads::SharedWorkloads,
    state::{
        authorization::{AuthorizationIndex, Decision, Policy, RequestAttributes, decide},
        membership::PeerAuthentication,
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
    pub connect_timeout: Duration,
    pub datapath: Arc<Datapath>,
    /// The node's own addresses: plaintext from them (kubelet probes) passes STRICT too.
    pub node_addresses: Vec<IpAddr>,
    /// AuthorizationPolicies by local pod, replaced on every change in the cluster.
    pub authorization: RwLock<Arc<AuthorizationIndex>>,
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
            .peer_of(crate::proxy::delivery::canonical(ip));
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

    pub fn policies_of(&self, pod: &DestinationPod) -> Vec<Arc<Policy>> {
        self.authorization
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .for_pod(&pod.display_name)
    }
}

/// One meshed pod as its inbound listeners (HBONE and plaintext) see it.
pub struct DestinationPod {
    pub display_name: String,
    /// Who it is, for metrics and access logs.
    pub peer: Peer,
    pub identity: SpiffeId,
    pub ips: Vec<IpAddr>,
    pub sockets: Arc<NetnsSockets>,
    /// Which families can be delivered with the client's address.
    pub source_preservation: SourcePreservation,
    /// The namespace's mode; changes in place when the namespace is relabelled.
    strict: AtomicBool,
    /// Plaintext connections to it through the proxy at once.
    pub plaintext_connections: Arc<Budget>,
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
        let pod = Self {
            display_name,
            peer,
            identity,
            ips,
            sockets,
            source_preservation,
            strict: AtomicBool::new(false),
            plaintext_connections: Budget::new("pod_plaintext_connections", usize::MAX),
            handshakes: PerClient::new(
                "pod_pending_handshakes",
                limits::MAX_PENDING_HANDSHAKES_PER_CLIENT,
                limits::MAX_PENDING_HANDSHAKES,
            ),
        };
        pod.set_peer_authentication(mode);
        pod
    }

    /// Bounds the plaintext connections to this pod through the proxy at once.
    pub fn with_connection_limit(mut self, limit: usize) -> Self {
        self.plaintext_connections = Budget::new("pod_plaintext_connections", limit);
        self
    }

    pub fn peer_authentication(&self) -> PeerAuthentication {
        if self.strict.load(Ordering::Relaxed) {
            PeerAuthentication::Strict
        } else {
            PeerAuthentication::Permissive
        }
    }

    pub fn set_peer_authentication(&self, mode: PeerAuthentication) {
        self.strict
            .store(mode == PeerAuthentication::Strict, Ordering::Relaxed);
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
    let Some(handshake) = pod.handshakes.try_acquire(peer.ip()) else {
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
    let policies = ctx.policies_of(&pod);
    let inspects_http = policies.iter().any(|p| p.inspects_http(target.port()));
    if !inspects_http {
        let attributes = RequestAttributes {
            source: Some(&peer_id),
            port: target.port(),
            http: None,
        };
        if let Decision::Deny(by) = decide(&policies, &attributes) {
            tracing::warn!(pod = %pod.display_name, %peer_id, %target, policy = %by, "authorization: connection denied");
            return status(StatusCode::FORBIDDEN);
        }
    }
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
        let (sent, received) = match hyper::upgrade::on(request).await {
            Ok(upgraded) if inspects_http => {
                let check = Check {
                    pod: pod.display_name.clone(),
                    policies,
                    peer: peer_id,
                    port: target.port(),
                    detect_wait: ctx.detect_wait,
                    traffic,
                    metrics: Arc::clone(&ctx.metrics),
                    access_log: ctx.access_log,
                };
                authorize::serve(TokioIo::new(upgraded), upstream, check).await
            }
            Ok(upgraded) => {
                let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
                let (sent, received) =
                    relay(TokioIo::new(upgraded), upstream, |_, app| reset(app)).await;
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

/// The `ip:port` a CONNECT names (HBONE's `:authority`); None for anything else (a host
/// name, a missing port, a path).
pub fn connect_target(uri: &hyper::Uri) -> Option<SocketAddr> {
    if uri
        .path_and_query()
        .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return None;
    }
    uri.authority()?.as_str().parse().ok()
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}
