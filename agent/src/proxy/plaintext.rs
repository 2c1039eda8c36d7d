//! Plaintext TCP that reaches a meshed pod from outside the mesh. The kernel's inbound
//! sk_lookup program (agent-ebpf/src/inbound.rs) hands every such connection to this
//! listener inside the pod; the accepted socket's local address is where the client was
//! going. The namespace's peer-authentication mode decides: STRICT resets the connection,
//! PERMISSIVE delivers it to the application and counts it, unless an AuthorizationPolicy
//! denies it: plaintext has no identity, and its HTTP requests are not parsed here. Connections
//! from the node's own addresses (the kubelet's probes) are delivered in both modes.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    delivery::{canonical, connect_to_application},
    inbound::{DestinationPod, InboundContext},
    limits,
    listener::accept_loop,
    relay::{relay, reset},
};
use crate::state::{
    authorization::{Decision, RequestAttributes, decide},
    membership::PeerAuthentication,
};
use crate::telemetry::{
    metrics::{Reporter, Traffic, UNKNOWN},
    report::ConnectionReport,
};

/// The source label of plaintext connections in the connection counters.
pub const PLAINTEXT_SOURCE: &str = "plaintext";

pub async fn serve(listener: TcpListener, pod: Arc<DestinationPod>, ctx: Arc<InboundContext>) {
    let name = pod.display_name.clone();
    accept_loop(listener, "plaintext", &name, |stream, peer| {
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
    let Some(_slot) = pod.plaintext_connections.try_acquire() else {
        limits::refuse(
            &client,
            &pod.plaintext_connections,
            &pod.display_name,
            &ctx.metrics,
        );
        return;
    };
    let target = match client.local_addr() {
        Ok(target) => target,
        Err(error) => {
            tracing::warn!(pod = %pod.display_name, %peer, %error, "plaintext: no original destination");
            return;
        }
    };
    let from_node = is_node_address(&ctx.node_addresses, peer.ip());
    if pod.peer_authentication() == PeerAuthentication::Strict && !from_node {
        ctx.stats.plaintext_refused();
        tracing::warn!(
            pod = %pod.display_name, %peer, %target,
            "plaintext refused: the namespace's peer authentication is STRICT, only mTLS from meshed pods is accepted"
        );
        reset(&client);
        return;
    }
    if !from_node {
        let attributes = RequestAttributes {
            source: None,
            port: target.port(),
            http: None,
        };
        if let Decision::Deny(by) = decide(&ctx.policies_of(&pod), &attributes) {
            ctx.stats.plaintext_refused();
            tracing::warn!(pod = %pod.display_name, %peer, %target, policy = %by, "plaintext refused by authorization policy");
            reset(&client);
            return;
        }
    }
    ctx.stats.plaintext_permitted();
    tracing::debug!(pod = %pod.display_name, %peer, %target, from_node, "plaintext permitted");
    let upstream = match connect_to_application(&pod, &ctx, target, None).await {
        Ok((upstream, _)) => upstream,
        Err(error) => {
            tracing::info!(pod = %pod.display_name, %peer, %target, %error, "plaintext: the application did not accept");
            ctx.stats.failed(PLAINTEXT_SOURCE, target);
            reset(&client);
            return;
        }
    };
    ctx.stats.opened(PLAINTEXT_SOURCE, target);
    let traffic = Traffic {
        reporter: Reporter::Destination,
        source: ctx.source_peer(peer.ip(), None),
        destination: pod.peer.clone(),
        destination_service: UNKNOWN.to_owned(),
        mutual_tls: false,
    };
    let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
    let (sent, received) = relay(client, upstream, |client, app| {
        reset(client);
        reset(app);
    })
    .await;
    ctx.stats.closed(PLAINTEXT_SOURCE, target, sent, received);
    report.close(sent, received);
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
    let mut found: Vec<IpAddr> = addrs
        .filter_map(|ifaddr| ifaddr.address)
        .filter_map(|addr| {
            addr.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    found.sort();
    found.dedup();
    found
}
