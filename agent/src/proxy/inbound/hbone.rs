//! HBONE server: the listener on port 15008 inside each meshed pod's network namespace.
//! It terminates mTLS with that pod's certificate, requires a client certificate from the
//! mesh's trust bundle and trust domain, and serves HTTP/2 CONNECT streams whose authority is
//! one of this pod's own addresses, delivering each to the application from inside the pod.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc};

use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, service::service_fn, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    authorize::{self, Check, Source},
    context::{DestinationPod, InboundContext},
    delivery::connect_to_application,
    revocation::withdrawn,
};
use crate::peer::{Reporter, Traffic, UNKNOWN};
use crate::{
    bounds::ClientSlot,
    identity::{spiffe::SpiffeId, tls},
    proxy::{
        hbone::{HBONE_SERVER_MAX_STREAMS, connect::connect_target},
        limits,
        listener::accept_loop,
        relay::{relay_until, reset},
    },
    state::{
        authorization::{Decision, Policy, RequestAttributes, decide},
        node::PodPolicies,
    },
    telemetry::report::ConnectionReport,
};

pub async fn serve(listener: TcpListener, pod: Arc<DestinationPod>, ctx: Arc<InboundContext>) {
    let name = pod.display_name.clone();
    accept_loop(listener, "HBONE", &name, &ctx.drain, |stream, peer| {
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
    let drain = ctx.drain.clone();
    let service = service_fn(move |request| {
        let (pod, ctx, peer_id) = (Arc::clone(&pod), Arc::clone(&ctx), peer_id.clone());
        async move { Ok::<_, Infallible>(handle_connect(request, pod, ctx, peer_id, peer).await) }
    });
    // Draining sends GOAWAY: source nodes open their next tunnels to the successor, and
    // this connection ends when its last tunnel does.
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(HBONE_SERVER_MAX_STREAMS)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(error) = drain
        .serve_until_drained(connection, |c| c.graceful_shutdown())
        .await
    {
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
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => {
                tracing::info!(%peer, %error, "HBONE upgrade failed");
                ctx.stats.closed(&source, target, 0, 0);
                return;
            }
        };
        if inspects_http {
            let check = Check {
                pod: pod.display_name.clone(),
                policies,
                source: Source::Mesh(peer_id),
                port,
                detect_wait: (!ctx.opaque_ports.contains(port)).then_some(ctx.detect_wait),
                traffic,
                metrics: Arc::clone(&ctx.metrics),
                access_log: ctx.access_log,
                drain: ctx.drain.clone(),
            };
            let (sent, received) = authorize::serve(upgraded, upstream, check).await;
            ctx.stats.closed(&source, target, sent, received);
            drop(tunnel);
            return;
        }
        // The relay gets a task of its own, sized to what it holds while the tunnel lives
        // (docs/benchmarks.md, memory per idle connection), and this one ends.
        let ends = TunnelEnds {
            pod,
            ctx,
            policies,
            decide: decide_tunnel,
            peer_id,
            target,
            source,
            traffic,
            tunnel,
        };
        tokio::spawn(relay_tunnel(upgraded, upstream, ends));
    });
    status(StatusCode::OK)
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// What a tunnel's relay needs besides its two ends.
struct TunnelEnds<D> {
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
    policies: PodPolicies,
    decide: D,
    peer_id: SpiffeId,
    target: SocketAddr,
    /// The peer's identity as the connection statistics name it.
    source: String,
    traffic: Traffic,
    tunnel: ClientSlot<SpiffeId>,
}

/// Relays an opaque tunnel until either end closes or a policy change denies it.
fn relay_tunnel<D: Fn(&[Arc<Policy>]) -> Decision>(
    upgraded: TokioIo<Upgraded>,
    upstream: TcpStream,
    ends: TunnelEnds<D>,
) -> impl Future<Output = ()> {
    let TunnelEnds {
        pod,
        ctx,
        policies,
        decide,
        peer_id,
        target,
        source,
        traffic,
        tunnel,
    } = ends;
    let name = pod.display_name.clone();
    let withdrawal = async move {
        let by = withdrawn(policies, None, decide).await;
        tracing::warn!(pod = %name, %peer_id, %target, policy = %by, "authorization withdrawn by a policy change: tunnel reset");
    };
    // Boxed before the task's future is made, so that the task holds a pointer to it
    // rather than a second, moved-from copy.
    let relay = Box::pin(relay_until(
        upgraded,
        upstream,
        |_, app| reset(app),
        withdrawal,
    ));
    async move {
        let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
        let (sent, received) = relay.await;
        drop(tunnel);
        report.close(sent, received);
        ctx.stats.closed(&source, target, sent, received);
    }
}
