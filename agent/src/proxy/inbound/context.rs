//! What the inbound side shares: the node-wide context every arriving connection is handled
//! with (HBONE or plaintext), and each meshed pod as a destination.

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls::RootCertStore;
use tokio::sync::watch;

use crate::peer::{Peer, UNKNOWN};
use crate::{
    config::OpaquePorts,
    datapath::Datapath,
    identity::{manager::IdentityManager, spiffe::SpiffeId},
    k8s::labels::PeerAuthentication,
    lifecycle::drain::Drain,
    netns::{NetnsSockets, SourcePreservation},
    proxy::{
        inbound::local::ByAddress,
        limits::{self, Budget, PerClient},
        listener::canonical,
    },
    state::{
        node::{NodeStateWatch, PodPolicies},
        probes::ProbePort,
        workloads::SharedWorkloads,
    },
    telemetry::{access::AccessLog, connections::ConnectionStats, metrics::Metrics},
};

/// The enrolled destination pods of this node by the addresses an HBONE CONNECT to them may
/// name.
pub type LocalPods = ByAddress<DestinationPod>;

/// What every inbound handler needs, shared by the node.
pub struct InboundContext {
    /// The agent's drain: connections are tracked in it, HTTP servers follow it.
    pub drain: Drain,
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
    /// The node's state (AuthorizationPolicies by local pod, the kubelet's probes), a new
    /// version on every change in the cluster; watched by the connections decided under it.
    pub state: NodeStateWatch,
    /// How long a stream that authorization must parse may take to show it is HTTP.
    pub detect_wait: Duration,
    /// Target ports decided without detection.
    pub opaque_ports: OpaquePorts,
    pub workloads: SharedWorkloads,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// The meshed pods of this node by address, for connections between two of them.
    pub local_pods: Arc<LocalPods>,
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
        PodPolicies::new(self.state.clone(), &pod.display_name)
    }

    /// What the kubelet's probes of `pod` do on `port`, if any use it.
    pub fn probe_port(&self, pod: &DestinationPod, port: u16) -> Option<ProbePort> {
        self.state.borrow().probes.port(&pod.display_name, port)
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
