//! Plaintext TCP that reaches a meshed pod from outside the mesh. The kernel's inbound
//! sk_lookup program (agent-ebpf/src/inbound.rs) hands every such connection to this
//! listener inside the pod; the accepted socket's local address is where the client was
//! going, and must be one of the pod's own addresses (a connection to the listener itself
//! would loop). The namespace's peer-authentication mode decides: STRICT resets the
//! connection, PERMISSIVE delivers it to the application and counts it, unless an
//! AuthorizationPolicy denies it: plaintext has no identity, and its HTTP requests are not
//! parsed here. A change of mode or policy that denies an established connection resets it.
//!
//! The node's own addresses get no more than anyone else, except for the kubelet's probes:
//! a connection from the node to a port the pod's probes use, which the mode or a policy
//! refuses, is served as HTTP where only the probes' requests (method and path) reach the
//! application (`authorize`); a TCP-only probe port gets its handshake and is closed
//! without a byte either way; an HTTPS probe port is delivered (its requests are inside the
//! application's TLS). Probe connections have their own bound, taken before any other.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    authorize::{self, Check, Source},
    context::{DestinationPod, InboundContext},
    delivery::connect_to_application,
    revocation::withdrawn,
};
use crate::peer::{Reporter, Traffic, UNKNOWN};
use crate::{
    k8s::labels::PeerAuthentication,
    netns::non_loopback,
    proxy::{
        http::HEADER_READ_TIMEOUT,
        limits,
        listener::{accept_loop, canonical},
        relay::{relay_until, reset},
    },
    state::{
        authorization::{Decision, Policy, RequestAttributes, decide},
        probes::ProbePort,
    },
    telemetry::report::ConnectionReport,
};

/// The source label of plaintext connections in the connection counters.
pub const PLAINTEXT_SOURCE: &str = "plaintext";

/// Why STRICT refuses plaintext, in logs and answers.
const STRICT_REFUSAL: &str =
    "the namespace's peer authentication is STRICT, only mTLS from meshed pods is accepted";

pub async fn serve(listener: TcpListener, pod: Arc<DestinationPod>, ctx: Arc<InboundContext>) {
    let name = pod.display_name.clone();
    accept_loop(listener, "plaintext", &name, &ctx.drain, |stream, peer| {
        let (pod, ctx) = (Arc::clone(&pod), Arc::clone(&ctx));
        serve_connection(stream, peer, pod, ctx)
    })
    .await
}

async fn serve_connection(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
) {
    let _ = client.set_nodelay(true);
    let target = match client.local_addr() {
        Ok(target) => target,
        Err(error) => {
            tracing::warn!(pod = %pod.display_name, %peer, %error, "plaintext: no original destination");
            return;
        }
    };
    if !pod.inbound_addresses.contains(&canonical(target.ip())) {
        ctx.stats.plaintext_refused();
        tracing::warn!(pod = %pod.display_name, %peer, %target, "plaintext refused: not addressed to one of the pod's addresses (a connection to the proxy's own listener)");
        reset(&client);
        return;
    }
    let peer_ip = canonical(peer.ip());
    let probe = is_node_address(&ctx.node_addresses, peer_ip)
        .then(|| ctx.probe_port(&pod, target.port()))
        .flatten();
    // Probes first, from their own bound: an outsider holding the plaintext bound cannot get
    // the kubelet's probes reset (and the pod restarted).
    let probe_slot = probe
        .as_ref()
        .and_then(|_| pod.probe_connections.try_acquire());
    let plaintext_slot = match probe_slot {
        Some(_) => None,
        None => match pod.plaintext_connections.try_acquire(&peer_ip) {
            Some(slot) => Some(slot),
            None => {
                let budget = pod.plaintext_connections.budget();
                limits::refuse(&client, budget, &pod.display_name, &ctx.metrics);
                return;
            }
        },
    };
    let _slots = (probe_slot, plaintext_slot);
    let decision = plaintext_decision(&pod, &ctx.policies(&pod).current(), target.port());
    match (decision, probe) {
        (Decision::Allow, _) => {
            ctx.stats.plaintext_permitted();
            tracing::debug!(pod = %pod.display_name, %peer, %target, "plaintext permitted");
            deliver(client, peer, target, pod, ctx).await;
        }
        (Decision::Deny(refusal), Some(probe)) => {
            ctx.stats.plaintext_permitted();
            tracing::debug!(pod = %pod.display_name, %peer, %target, "plaintext from the node to a probe port: only the probes pass");
            let refused = Refused { probe, refusal };
            serve_probe(client, peer, target, refused, pod, ctx).await;
        }
        (Decision::Deny(refusal), None) => {
            ctx.stats.plaintext_refused();
            tracing::warn!(pod = %pod.display_name, %peer, %target, refused_by = %refusal, "plaintext refused");
            reset(&client);
        }
    }
}

/// STRICT refuses plaintext; otherwise the pod's policies decide, for a client without an
/// identity. `Deny` says which.
fn plaintext_decision(pod: &DestinationPod, policies: &[Arc<Policy>], port: u16) -> Decision {
    if pod.peer_authentication() == PeerAuthentication::Strict {
        return Decision::Deny(STRICT_REFUSAL.to_owned());
    }
    let attributes = RequestAttributes {
        source: None,
        port,
        http: None,
    };
    match decide(policies, &attributes) {
        Decision::Deny(by) => Decision::Deny(format!("authorization policy {by}")),
        allow => allow,
    }
}

/// Relays an allowed plaintext connection to the application, until either end closes or a
/// change of mode or policy denies it.
async fn deliver(
    client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
) {
    let Some(upstream) = connect(&client, peer, target, &pod, &ctx).await else {
        return;
    };
    let traffic = plaintext_traffic(&ctx, &pod, peer);
    let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
    let watched = Arc::clone(&pod);
    let withdrawal = async {
        let decide = |current: &[Arc<Policy>]| plaintext_decision(&watched, current, target.port());
        let mode = Some(pod.watch_peer_authentication());
        let by = withdrawn(ctx.policies(&pod), mode, decide).await;
        tracing::warn!(pod = %pod.display_name, %peer, %target, refused_by = %by, "plaintext connection reset: a change of mode or policy denies it now");
    };
    let (sent, received) = relay_until(client, upstream, withdrawal).await;
    ctx.stats.closed(PLAINTEXT_SOURCE, target, sent, received);
    report.close(sent, received);
}

/// A connection from the node to a probe port, which `refusal` refuses otherwise.
struct Refused {
    probe: ProbePort,
    refusal: String,
}

/// Serves the node's connection to a probe port: only the probes pass.
async fn serve_probe(
    client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    Refused { probe, refusal }: Refused,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
) {
    if probe.tls {
        // The kubelet's requests are inside the application's TLS: it cannot be told apart.
        return deliver(client, peer, target, pod, ctx).await;
    }
    if !probe.has_http_probes() {
        // A TCP probe succeeds at the handshake, done by now: close without carrying a byte.
        return;
    }
    let Some(upstream) = connect(&client, peer, target, &pod, &ctx).await else {
        return;
    };
    let check = Check {
        pod: pod.display_name.clone(),
        policies: ctx.policies(&pod),
        source: Source::NodeProbe {
            peer: peer.ip(),
            probe,
            refusal,
        },
        port: target.port(),
        // The kubelet speaks first, but on a busy node maybe later than a mesh client.
        detect_wait: Some(HEADER_READ_TIMEOUT),
        traffic: plaintext_traffic(&ctx, &pod, peer),
        metrics: Arc::clone(&ctx.metrics),
        access_log: ctx.access_log,
        drain: ctx.drain.clone(),
    };
    let (sent, received) = authorize::serve(client, upstream, check).await;
    ctx.stats.closed(PLAINTEXT_SOURCE, target, sent, received);
}

/// Connects to the application for `client`, counting the connection; None (the client
/// reset) when the application does not accept.
async fn connect(
    client: &TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    pod: &DestinationPod,
    ctx: &InboundContext,
) -> Option<TcpStream> {
    match connect_to_application(pod, ctx, target, None).await {
        Ok((upstream, _)) => {
            ctx.stats.opened(PLAINTEXT_SOURCE, target);
            Some(upstream)
        }
        Err(error) => {
            tracing::info!(pod = %pod.display_name, %peer, %target, %error, "plaintext: the application did not accept");
            ctx.stats.failed(PLAINTEXT_SOURCE, target);
            reset(client);
            None
        }
    }
}

fn plaintext_traffic(ctx: &InboundContext, pod: &DestinationPod, peer: SocketAddr) -> Traffic {
    Traffic {
        reporter: Reporter::Destination,
        source: ctx.source_peer(peer.ip(), None),
        destination: pod.peer.clone(),
        destination_service: UNKNOWN.to_owned(),
        mutual_tls: false,
    }
}

fn is_node_address(node_addresses: &[IpAddr], peer: IpAddr) -> bool {
    node_addresses.contains(&canonical(peer))
}

/// The addresses of the agent's own network namespace (the node's, as the agent runs with
/// hostNetwork), loopback excluded: the source of the kubelet's probes.
pub fn node_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!(
            "cannot list the node's addresses; plaintext probes from the node will be treated like any other plaintext"
        );
        return Vec::new();
    };
    let mut found = non_loopback(addrs);
    found.sort();
    found.dedup();
    found
}
