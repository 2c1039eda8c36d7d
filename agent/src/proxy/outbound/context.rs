//! What the outbound side shares: the node-wide context every captured connection is
//! handled with, the L7 proxy's state in it, and each meshed pod as the source of traffic.
//! Dialling a destination the way the mesh carries it starts here.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpStream;

use super::{
    balance::Balancer,
    pool::UpstreamPool,
    upstream::{DialError, OutboundError, Upstream},
};
use crate::peer::{Peer, UNKNOWN, ZonePair};
use crate::{
    config::OpaquePorts,
    datapath::Datapath,
    identity::spiffe::SpiffeId,
    lifecycle::drain::Drain,
    netns::NetnsSockets,
    proxy::{
        dial::{connect_within, pod_socket},
        hbone::client::HboneClient,
        inbound::{
            admission::{Admission, Admitted},
            context::InboundContext,
        },
        limits::Budget,
        socket_pair,
    },
    state::{
        node::NodeStateWatch,
        services::{Resolution, SharedServices},
        workloads::SharedWorkloads,
    },
    telemetry::{access::AccessLog, connections::ConnectionStats, metrics::Metrics, otlp::Tracer},
};

/// What every outbound connection handler needs, shared by all pods of the node.
pub struct OutboundContext {
    /// The agent's drain: connections are tracked in it, HTTP servers follow it.
    pub drain: Drain,
    pub datapath: Arc<Datapath>,
    pub stats: Arc<ConnectionStats>,
    pub proxy_mark: u32,
    pub connect_timeout: Duration,
    /// Present when the node holds workload identities (a CA is configured).
    pub hbone: Option<Arc<HboneClient>>,
    pub workloads: SharedWorkloads,
    pub services: SharedServices,
    /// The node's state: the HTTPRoutes in force.
    pub state: NodeStateWatch,
    pub http: HttpProxy,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub tracer: Tracer,
    /// `--max-connections-per-pod`.
    pub max_connections_per_pod: usize,
    /// The inbound side of this node, which admits a connection to one of its own meshed
    /// pods in process; absent without identities, or with `--same-node-hbone`.
    pub same_node: Option<Arc<InboundContext>>,
}

/// A connection to a Service's virtual address while the Service has no ready endpoint.
#[derive(Debug, thiserror::Error)]
#[error("Service {service} has no ready endpoint")]
pub struct NoReadyEndpoint {
    /// `namespace/name`.
    pub service: String,
}

impl OutboundContext {
    /// Where to dial for `original`: a Service's virtual address becomes one of its ready
    /// endpoints (with this node's zone and the endpoint's, when this node has one), not
    /// one in `tried` or ejected while another is there; anything else stays as it is.
    pub fn route(
        &self,
        original: SocketAddr,
        tried: &[SocketAddr],
    ) -> Result<(SocketAddr, Option<ZonePair>), NoReadyEndpoint> {
        let index = self.services.read().unwrap_or_else(|p| p.into_inner());
        let usable = |e: &SocketAddr| !tried.contains(e) && self.http.balancer.usable(e);
        match index.resolve(original, usable) {
            Resolution::NotAService => Ok((original, None)),
            Resolution::Endpoint { addr, zone, .. } => Ok((addr, index.zones_to(zone))),
            Resolution::NoReadyEndpoint { service } => Err(NoReadyEndpoint {
                service: service.to_owned(),
            }),
        }
    }

    /// The identity of the meshed pod at `ip`, when traffic to it must use HBONE.
    fn hbone_destination(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.hbone.as_ref()?;
        let index = self.workloads.read().unwrap_or_else(|p| p.into_inner());
        index.identity_of(ip).cloned()
    }

    /// Who owns `ip`, for metrics and access logs.
    pub fn peer_of(&self, ip: IpAddr) -> Peer {
        self.workloads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .peer_of(ip)
    }

    /// Where a connection of `pod` to `target` goes: to the inbound side of this node when
    /// `target` is a meshed pod here (and both pods hold their certificates, as HBONE
    /// would require), else to an upstream `dial` connects.
    pub async fn connect(
        &self,
        pod: &SourcePod,
        target: SocketAddr,
    ) -> Result<Connected, DialError> {
        if let Some(admission) = self.same_node_admission(pod, target) {
            return Ok(Connected::ThisNode(Box::new(admission.admit().await?)));
        }
        Ok(Connected::Upstream(self.dial(pod, target).await?))
    }

    /// The admission of `pod`'s connection to `target` by this node's inbound side, when
    /// `target` is a meshed pod of this node that the connection may be handed to.
    fn same_node_admission(&self, pod: &SourcePod, target: SocketAddr) -> Option<Admission> {
        let inbound = self.same_node.as_ref()?;
        let destination = inbound.local_pods.at(target.ip())?;
        // The identity the cluster state gives the address, which HBONE would have required
        // of the destination's certificate: a pod enrolled under an address the cluster has
        // given another since is not handed anything.
        let index = self.workloads.read().unwrap_or_else(|p| p.into_inner());
        if index.identity_of(target.ip()) != Some(&destination.identity) {
            return None;
        }
        drop(index);
        let source_id = pod.identity.as_ref()?;
        let client = *pod.ips.iter().find(|ip| ip.is_ipv4() == target.is_ipv4())?;
        let certified = |id| inbound.identities.certificate(id).is_some();
        if !certified(source_id) || !certified(&destination.identity) {
            return None;
        }
        Some(Admission {
            pod: destination,
            ctx: Arc::clone(inbound),
            peer_id: source_id.clone(),
            client,
            target,
        })
    }

    /// Connects `pod` to `target` for the L7 proxy's pooled connections: as `dial`, except
    /// that a meshed pod of this node is reached in process. Its inbound side admits the
    /// connection as it would an HBONE CONNECT and serves the far end of a socket pair
    /// towards the application; the pool speaks HTTP on the near end.
    pub async fn dial_pooled(
        &self,
        pod: &SourcePod,
        target: SocketAddr,
    ) -> Result<Upstream, DialError> {
        let Some(admission) = self.same_node_admission(pod, target) else {
            return self.dial(pod, target).await;
        };
        let admitted = admission.admit().await?;
        let (near, far) = match socket_pair::pair() {
            Ok(pair) => pair,
            Err(error) => {
                admitted.abandon();
                return Err(DialError::SocketPair(error));
            }
        };
        tokio::spawn(admitted.serve(far));
        Ok(Upstream::ThisNode(near))
    }

    /// Connects `pod` to `target` the way the mesh carries its traffic between nodes: HBONE
    /// to a meshed pod, plain TCP from the pod's network namespace to anything else.
    async fn dial(&self, pod: &SourcePod, target: SocketAddr) -> Result<Upstream, DialError> {
        match self.hbone.as_ref().zip(self.hbone_destination(target.ip())) {
            Some((mesh, destination)) => {
                let source_id = pod.identity.as_ref().ok_or(DialError::NoIdentity)?;
                let tunnel = mesh
                    .open(
                        &pod.sockets,
                        source_id,
                        &destination,
                        target,
                        self.proxy_mark,
                        self.connect_timeout,
                    )
                    .await?;
                Ok(Upstream::Mesh(tunnel))
            }
            None => Ok(Upstream::Direct(connect_upstream(pod, self, target).await?)),
        }
    }
}

/// Node-wide L7 state.
pub struct HttpProxy {
    /// Shared with the admin server, which shows it.
    pub balancer: Arc<Balancer>,
    pub upstreams: UpstreamPool,
    /// How long detection waits for a client's first bytes.
    pub detect_wait: Duration,
    /// Service ports relayed without detection.
    pub opaque_ports: OpaquePorts,
}

impl HttpProxy {
    pub fn new(detect_wait: Duration, opaque_ports: OpaquePorts, balancer: Arc<Balancer>) -> Self {
        Self {
            balancer,
            upstreams: UpstreamPool::default(),
            detect_wait,
            opaque_ports,
        }
    }
}

/// What a relayed connection was connected to.
pub enum Connected {
    /// Another node's pod, or anything outside the mesh.
    Upstream(Upstream),
    /// A meshed pod of this node, admitted by its inbound side, connected to its
    /// application and waiting for the client's stream.
    ThisNode(Box<Admitted>),
}

/// One meshed pod as the proxy sees it.
pub struct SourcePod {
    pub display_name: String,
    pub namespace: String,
    pub workload: String,
    pub identity: Option<SpiffeId>,
    /// Its addresses: the source of what it sends to a pod of this node.
    pub ips: Vec<IpAddr>,
    pub sockets: Arc<NetnsSockets>,
    /// Its connections through the proxy at once.
    pub connections: Arc<Budget>,
}

impl SourcePod {
    /// This pod as the source of traffic, for metrics and access logs.
    pub fn peer(&self) -> Peer {
        Peer {
            workload: self.workload.clone(),
            namespace: self.namespace.clone(),
            principal: self
                .identity
                .as_ref()
                .map_or_else(|| UNKNOWN.to_owned(), ToString::to_string),
        }
    }
}

async fn connect_upstream(
    pod: &SourcePod,
    ctx: &OutboundContext,
    destination: SocketAddr,
) -> Result<TcpStream, OutboundError> {
    let socket = pod_socket(&pod.sockets, destination, ctx.proxy_mark)?;
    match connect_within(socket, destination, ctx.connect_timeout).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(OutboundError::Connect(destination, error)),
        Err(_) => Err(OutboundError::ConnectTimeout(
            destination,
            ctx.connect_timeout,
        )),
    }
}
