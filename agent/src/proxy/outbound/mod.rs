//! Outbound: connections a meshed pod made, captured into the listener the agent opened on
//! the pod's loopback, forwarded to their original destination from the pod's own network
//! namespace (so from the pod's own address). A destination that is a meshed pod goes
//! through HBONE (mutual TLS) when the node has identities, or, when it is a pod of this
//! node, straight to this node's inbound side, which admits it in process; anything else
//! passes through.
//! A connection to a Service port whose first bytes are HTTP goes to the L7 proxy (`l7`)
//! instead, which routes (`request`) and balances (`balance`) each request over pooled
//! upstream connections (`pool`).
//!
//! A connection's path: `serve` accepts it and `forward` finds its original destination,
//! then either relays it to an `upstream` dialled with the `context` (or to the application
//! of a pod of this node the inbound side admitted it to), or hands it to `l7`.

pub mod balance;
pub mod context;
pub mod l7;
pub mod pool;
pub mod request;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc};

use nodemesh_common::ConnectionKey;
use tokio::net::{TcpListener, TcpStream};

use self::{
    balance::Outcome,
    context::{Connected, NoReadyEndpoint, OutboundContext, SourcePod},
    request::ClientConnection,
    upstream::{OutboundError, Upstream},
};
use super::{
    counting::{Meter, MeteredStream},
    detect::{self, Detection, Prefixed, Protocol},
    limits,
    listener::{accept_loop, canonical},
    relay::{relay, reset},
};
use crate::peer::{Reporter, Traffic, UNKNOWN, ZonePair};
use crate::{
    datapath::{address_words, socket_addr},
    telemetry::{connections::DetectionOutcome, metrics, report::ConnectionReport},
};

/// Accepts captured connections of one pod until the listener is dropped with the task.
pub async fn serve(listener: TcpListener, pod: Arc<SourcePod>, ctx: Arc<OutboundContext>) {
    let name = pod.display_name.clone();
    accept_loop(listener, "outbound", &name, &ctx.drain, |client, peer| {
        let (pod, ctx) = (Arc::clone(&pod), Arc::clone(&ctx));
        async move { forward(client, peer, &pod, &ctx).await }
    })
    .await
}

/// One captured connection: find where it was going, then either hand it to the L7 proxy
/// (HTTP to a Service) or relay its bytes to an upstream.
///
/// This future lives as long as the connection, idle or not, so it keeps only what the relay
/// needs: the steps before the relay (detection, the L7 server, dialling, with their TLS and
/// HTTP state) run boxed, and their memory is gone once they finish (docs/benchmarks.md,
/// "memory per idle connection").
async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    pod: &Arc<SourcePod>,
    ctx: &Arc<OutboundContext>,
) {
    // The proxy forwards what it reads at once; Nagle would only add delay.
    let _ = client.set_nodelay(true);
    let key = connection_key(pod.sockets.cookie(), peer);
    let Some(original) = ctx
        .datapath
        .take_original_destination(&key)
        .map(socket_addr)
    else {
        tracing::warn!(pod = %pod.display_name, error = %OutboundError::NoOriginalDestination(peer), "dropping connection");
        reset(&client);
        return;
    };
    let Some(_slot) = pod.connections.try_acquire() else {
        limits::refuse(&client, &pod.connections, &pod.display_name, &ctx.metrics);
        return;
    };
    ctx.stats.opened(&pod.display_name, original);
    let frontend = ctx
        .services
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .frontend(original);
    let destination_service = frontend
        .as_ref()
        .map_or_else(|| UNKNOWN.to_owned(), |f| metrics::service_fqdn(&f.service));
    let client = match frontend {
        Some(frontend) => {
            let connection =
                ClientConnection::new(Arc::clone(pod), Arc::clone(ctx), frontend, original);
            match Box::pin(detect_or_serve_l7(client, connection)).await {
                Some(client) => client,
                None => return,
            }
        }
        None => Prefixed::new(Vec::new(), client),
    };
    let Some(target) = Box::pin(dial(&client, original, pod, ctx)).await else {
        return;
    };
    let (target, zones, connected) = target;
    let traffic = Traffic {
        reporter: Reporter::Source,
        source: pod.peer(),
        destination: ctx.peer_of(target.ip()),
        destination_service,
        // On this node the identities are the capture's, as authenticated as a certificate.
        mutual_tls: !matches!(connected, Connected::Upstream(Upstream::Direct(_))),
    };
    let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
    let (sent, received) = match connected {
        Connected::Upstream(upstream) => relay(client, upstream).await,
        Connected::ThisNode(admitted) => admitted.serve(client).await,
    };
    ctx.stats
        .closed(&pod.display_name, original, sent, received);
    report.close(sent, received);
    if let Some(zones) = &zones {
        ctx.metrics.zone_connection(zones, sent + received);
    }
    tracing::debug!(pod = %pod.display_name, destination = %original, %target, sent, received, "connection closed");
}

/// A connection to a Service port: detects its protocol (unless its `appProtocol` says) and
/// serves HTTP in the L7 proxy to its end. Returns the connection, with the bytes detection
/// read, when it is to be relayed instead.
async fn detect_or_serve_l7(
    mut client: TcpStream,
    mut connection: ClientConnection,
) -> Option<Prefixed<TcpStream>> {
    let (pod, ctx, original) = (&connection.pod, &connection.ctx, connection.original);
    let app_protocol = connection.frontend.app_protocol.as_deref();
    let opaque_port = ctx.http.opaque_ports.contains(original.port());
    let wait = match detect::detection_for(app_protocol, opaque_port, ctx.http.detect_wait) {
        Detection::Skip => {
            ctx.stats.detected(DetectionOutcome::Skipped);
            ctx.metrics.detected(DetectionOutcome::Skipped);
            return Some(Prefixed::new(Vec::new(), client));
        }
        Detection::Unbounded => None,
        Detection::Bounded(wait) => Some(wait),
    };
    let detected = match detect::detect(&mut client, wait).await {
        Ok(detected) => detected,
        Err(error) => {
            tracing::debug!(pod = %pod.display_name, destination = %original, %error, "client failed before sending");
            ctx.stats.closed(&pod.display_name, original, 0, 0);
            return None;
        }
    };
    let protocol = detected.protocol;
    let outcome = match protocol {
        _ if detected.timed_out => DetectionOutcome::TimedOut,
        Protocol::Http1 => DetectionOutcome::Http1,
        Protocol::Http2 => DetectionOutcome::Http2,
        Protocol::Tls => DetectionOutcome::Tls,
        Protocol::Opaque => DetectionOutcome::Opaque,
    };
    ctx.stats.detected(outcome);
    ctx.metrics.detected(outcome);
    tracing::debug!(pod = %pod.display_name, destination = %original, ?protocol, timed_out = detected.timed_out, "protocol detected");
    if !matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        return Some(Prefixed::new(detected.prefix, client));
    }
    let (pod, ctx) = (Arc::clone(pod), Arc::clone(ctx));
    connection.protocol = protocol;
    let meter = Arc::new(Meter::default());
    let stream = MeteredStream::new(Prefixed::new(detected.prefix, client), Arc::clone(&meter));
    l7::serve(stream, connection).await;
    ctx.stats
        .closed(&pod.display_name, original, meter.read(), meter.written());
    None
}

/// Routes the connection and connects it to its destination; on failure, resets `client`
/// and counts it.
async fn dial(
    client: &Prefixed<TcpStream>,
    original: SocketAddr,
    pod: &Arc<SourcePod>,
    ctx: &Arc<OutboundContext>,
) -> Option<(SocketAddr, Option<ZonePair>, Connected)> {
    // Service endpoints already tried for this connection: nothing has been sent yet, so a
    // failed connect moves on to another endpoint (the nearest left) before giving up.
    let mut tried = Vec::new();
    loop {
        let (target, zones) = match ctx.route(original, &tried) {
            Ok(routed) => routed,
            Err(NoReadyEndpoint { service }) => {
                tracing::info!(pod = %pod.display_name, destination = %original, %service, "Service has no ready endpoint; refusing");
                ctx.stats.failed(&pod.display_name, original);
                reset(client.inner());
                return None;
            }
        };
        // A virtual address is never an endpoint's: this is a Service's endpoint.
        let endpoint = target != original;
        let error = match ctx.connect(pod, target).await {
            Ok(connected) => {
                if endpoint {
                    ctx.http.balancer.connected(target, Outcome::Success);
                }
                return Some((target, zones, connected));
            }
            Err(error) => error,
        };
        let endpoint_failed = endpoint && error.endpoint_failed();
        if endpoint_failed {
            ctx.http.balancer.connected(target, Outcome::Failure);
        }
        if endpoint_failed && !tried.contains(&target) && tried.len() + 1 < CONNECT_ATTEMPTS {
            tracing::info!(pod = %pod.display_name, destination = %original, %target, %error, "endpoint connect failed; trying another");
            tried.push(target);
            continue;
        }
        tracing::info!(pod = %pod.display_name, destination = %original, %target, %error, "upstream connect failed");
        ctx.stats.failed(&pod.display_name, original);
        // The application's connect() already succeeded against the proxy: a reset is the
        // closest thing to the refusal it would have seen.
        reset(client.inner());
        return None;
    }
}

/// Endpoints a connection to a Service tries before it is reset.
const CONNECT_ATTEMPTS: usize = 3;

/// The key under which sock_ops published the connection whose client end is `peer`
/// (v4-mapped peers are keyed as IPv4, as the kernel keys them).
pub fn connection_key(netns_cookie: u64, peer: SocketAddr) -> ConnectionKey {
    let (addr, family) = address_words(canonical(peer.ip()));
    ConnectionKey {
        netns_cookie,
        addr,
        port: peer.port(),
        family,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use nodemesh_common::{FAMILY_V4, OriginalDst};

    use super::*;

    #[test]
    fn keys_and_addresses_use_the_kernel_encoding() {
        let key = connection_key(7, "127.0.0.1:40000".parse().unwrap());
        // The kernel stores IPv4 in network byte order: 127.0.0.1 is 0x0100007f read natively.
        assert_eq!(key.addr, [0x0100_007f, 0, 0, 0]);
        assert_eq!(
            (key.port, key.family, key.netns_cookie),
            (40000, FAMILY_V4, 7)
        );
        let mapped = connection_key(7, "[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(mapped, key, "v4-mapped peers are keyed as IPv4");

        let v6 = OriginalDst {
            netns_cookie: 1,
            addr: address_words("fd77:2::10".parse().unwrap()).0,
            port: 80,
            family: nodemesh_common::FAMILY_V6,
            _pad: 0,
        };
        assert_eq!(
            socket_addr(v6),
            "[fd77:2::10]:80".parse::<SocketAddr>().unwrap()
        );
        let v4 = OriginalDst {
            netns_cookie: 1,
            addr: [u32::from_ne_bytes([198, 18, 2, 10]), 0, 0, 0],
            port: 7000,
            family: FAMILY_V4,
            _pad: 0,
        };
        assert_eq!(
            socket_addr(v4),
            "198.18.2.10:7000".parse::<SocketAddr>().unwrap()
        );
    }
}
