//! Admitting a meshed client to a pod of this node, whichever way it came: over HBONE (its
//! identity proved by mutual TLS, `hbone`) or from a pod of this same node, handed over in
//! process by the outbound side (its identity known from the capture, `local`). Every such
//! tunnel goes through the same steps: the pod's authorization policies, the bound on
//! tunnels per peer identity, the connection to the application from inside the pod, and
//! then the relay (or, where a policy looks at requests, the per-request checks) with its
//! telemetry and its withdrawal when the policies change.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use hyper::StatusCode;
use tokio::net::TcpStream;

use super::{
    authorize::{self, Check, Source},
    context::{DestinationPod, InboundContext},
    delivery::connect_to_application,
    revocation::stream_withdrawn,
};
use crate::peer::{Reporter, Traffic, UNKNOWN};
use crate::{
    bounds::ClientSlot,
    identity::spiffe::SpiffeId,
    proxy::relay::{Relayable, relay_until, reset},
    state::{
        authorization::{Decision, decide_stream},
        node::PodPolicies,
    },
    telemetry::report::ConnectionReport,
};

/// A meshed client asking for a tunnel to `target`, an address of `pod`.
pub struct Admission {
    pub pod: Arc<DestinationPod>,
    pub ctx: Arc<InboundContext>,
    /// Who the client is: verified by mutual TLS, or by the capture on this node.
    pub peer_id: SpiffeId,
    /// The client pod's address: the application sees it as the source where the pod's
    /// routing allows.
    pub client: IpAddr,
    pub target: SocketAddr,
}

/// Why a tunnel was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("denied by authorization policy {0}")]
    Denied(String),
    #[error("the peer identity is at its bound of tunnels to this pod")]
    AtBound,
    #[error("the application did not accept: {0}")]
    Application(io::Error),
}

impl Refusal {
    /// The status an HBONE CONNECT is refused with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::AtBound | Self::Application(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl Admission {
    /// Decides the tunnel (unless a policy looks at its requests, which are decided one by
    /// one), takes a slot of the peer's tunnel bound and connects to the application.
    pub async fn admit(self) -> Result<Admitted, Refusal> {
        let Self {
            pod,
            ctx,
            peer_id,
            client,
            target,
        } = self;
        let policies = ctx.policies(&pod);
        let port = target.port();
        let in_force = policies.current();
        let inspects_http = in_force.iter().any(|p| p.inspects_http(port));
        if !inspects_http && let Decision::Deny(by) = decide_stream(&in_force, &peer_id, port) {
            tracing::warn!(pod = %pod.display_name, %peer_id, %target, policy = %by, "authorization: connection denied");
            return Err(Refusal::Denied(by));
        }
        let Some(tunnel) = pod.tunnels.try_acquire(&peer_id) else {
            ctx.metrics
                .refused(pod.tunnels.budget().reason, &pod.display_name);
            if pod.tunnels.budget().log_refusal() {
                tracing::warn!(pod = %pod.display_name, %peer_id, limit = pod.tunnels.limit_per_client(), "tunnel refused: the peer identity is at its bound for this pod (logged at most every 10 s)");
            }
            return Err(Refusal::AtBound);
        };
        let upstream = match connect_to_application(&pod, &ctx, target, Some(client)).await {
            Ok((upstream, _)) => upstream,
            Err(error) => {
                tracing::info!(pod = %pod.display_name, %peer_id, %target, %error, "the application did not accept a tunnel");
                return Err(Refusal::Application(error));
            }
        };
        let source = peer_id.to_string();
        ctx.stats.opened(&source, target);
        let traffic = Traffic {
            reporter: Reporter::Destination,
            source: ctx.source_peer(client, Some(&peer_id)),
            destination: pod.peer.clone(),
            destination_service: UNKNOWN.to_owned(),
            mutual_tls: true,
        };
        Ok(Admitted {
            pod,
            ctx,
            policies,
            inspects_http,
            peer_id,
            target,
            source,
            traffic,
            tunnel,
            upstream,
        })
    }
}

/// An admitted tunnel, connected to the application, waiting for its client's stream.
pub struct Admitted {
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
    policies: PodPolicies,
    /// A policy looks at this port's requests: they are decided one by one.
    inspects_http: bool,
    peer_id: SpiffeId,
    target: SocketAddr,
    /// The peer's identity as the connection statistics name it.
    source: String,
    traffic: Traffic,
    tunnel: ClientSlot<SpiffeId>,
    upstream: TcpStream,
}

/// What serving an admitted tunnel is: the bytes read from the client's stream and from the
/// application once it ends.
pub type Serving = Pin<Box<dyn Future<Output = (u64, u64)> + Send>>;

impl Admitted {
    /// The client went away before its stream was there: the application's connection is
    /// reset too.
    pub fn abandon(self) {
        reset(&self.upstream);
        self.ctx.stats.closed(&self.source, self.target, 0, 0);
    }

    /// Serves `stream` (the client's end) towards the application until either end closes,
    /// or a policy change denies the tunnel.
    ///
    /// Built before it is polled, and boxed: whoever runs it (a task of its own for HBONE
    /// and for the L7 proxy's pooled connections on this node, the outbound connection's
    /// task for L4 on this node) holds a pointer to what the tunnel keeps while it lives
    /// (docs/benchmarks.md, memory per idle connection).
    pub fn serve<T: Relayable + Send + 'static>(self, stream: T) -> Serving {
        let (ctx, target, source, tunnel) = (self.ctx, self.target, self.source, self.tunnel);
        if self.inspects_http {
            let check = Check {
                pod: self.pod.display_name.clone(),
                policies: self.policies,
                source: Source::Mesh(self.peer_id),
                port: target.port(),
                detect_wait: (!ctx.opaque_ports.contains(target.port())).then_some(ctx.detect_wait),
                traffic: self.traffic,
                metrics: Arc::clone(&ctx.metrics),
                access_log: ctx.access_log,
                drain: ctx.drain.clone(),
            };
            return Box::pin(async move {
                let (sent, received) = authorize::serve(stream, self.upstream, check).await;
                ctx.stats.closed(&source, target, sent, received);
                drop(tunnel);
                (sent, received)
            });
        }
        let (name, port) = (self.pod.display_name.clone(), target.port());
        let (policies, peer_id, traffic) = (self.policies, self.peer_id, self.traffic);
        let withdrawal = async move {
            let by = stream_withdrawn(policies, &peer_id, port).await;
            tracing::warn!(pod = %name, %peer_id, %target, policy = %by, "authorization withdrawn by a policy change: tunnel reset");
        };
        // Boxed before the outer future is made, so that it holds a pointer to the relay
        // rather than a second, moved-from copy of both ends.
        let relay = Box::pin(relay_until(stream, self.upstream, withdrawal));
        Box::pin(async move {
            let report = ConnectionReport::open(&ctx.metrics, ctx.access_log, &traffic, target);
            let (sent, received) = relay.await;
            drop(tunnel);
            report.close(sent, received);
            ctx.stats.closed(&source, target, sent, received);
            (sent, received)
        })
    }
}
