//! The node's state as one immutable version: what the cluster asks of this node (HTTPRoutes,
//! AuthorizationPolicies, the kubelet's probes), what enrolling its pods made of it, and what
//! was rejected. The agent builds each version whole and publishes it through one
//! `tokio::sync::watch` channel; the proxy and the admin API read the version current when
//! they look, so no reader sees the routes of one version beside the policies of another.
//! Connections decided once follow the channel (`PodPolicies`) and are decided again when a
//! new version comes.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::watch;

use super::{
    authorization::{AuthorizationIndex, Policy},
    probes::ProbeIndex,
    routes::RouteTable,
};
use crate::{
    k8s::labels::{InboundUdp, PeerAuthentication},
    netns::SourcePreservation,
};

/// One version of the node's state; never changed once published.
#[derive(Debug, Default)]
pub struct NodeState {
    /// HTTPRoutes in force (the last good version of a rejected one).
    pub routes: Arc<RouteTable>,
    /// AuthorizationPolicies by local pod (the last good version of a rejected one).
    pub authorization: Arc<AuthorizationIndex>,
    /// The kubelet's probes of each local pod.
    pub probes: Arc<ProbeIndex>,
    /// Pods enrolled, and pods held closed until enrolling them succeeds.
    pub enrolled: Vec<EnrolledPodView>,
    pub pending: Vec<PendingPodView>,
    /// Every manifest, HTTPRoute and AuthorizationPolicy rejected in this version.
    pub config_errors: Vec<String>,
}

/// Where readers follow the node's state: every version the agent publishes.
pub type NodeStateWatch = watch::Receiver<Arc<NodeState>>;

/// An enrolled pod, as the config dump shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EnrolledPodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns_inode: u64,
    pub netns_cookie: u64,
    pub listeners: Vec<SocketAddr>,
    pub peer_authentication: PeerAuthentication,
    /// Whether UDP from outside the pod is dropped.
    pub inbound_udp: InboundUdp,
    /// Whether the pod's UDP DNS goes to the agent's DNS listener in it.
    pub dns_capture: bool,
    /// Whether plaintext arriving at the pod is captured (the node holds identities).
    pub inbound_capture: bool,
    /// The addresses whose plaintext is captured: `ips` and the other non-loopback addresses
    /// its network namespace had at enrolment (IPv6 link-local, secondary interfaces).
    pub inbound_addresses: Vec<IpAddr>,
    /// Whether mTLS traffic reaches the application with the client pod's address.
    pub source_preservation: SourcePreservation,
}

/// A meshed pod that could not be enrolled yet, why, and what keeps it closed meanwhile.
#[derive(Clone, Debug, Serialize)]
pub struct PendingPodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: String,
    /// The pod cgroup kept in the enrolment map (unknown until the kubelet creates it): its
    /// connects follow the fail mode while the pod is pending.
    pub cgroup_id: Option<u64>,
    pub peer_authentication: PeerAuthentication,
    /// Whether the pod's addresses are under inbound capture (a STRICT pod drops plaintext).
    pub inbound_held: bool,
}

/// The policies in force for one local pod, followed as they change: decisions made per
/// request read the current ones, and connections decided once watch for changes.
#[derive(Clone)]
pub struct PodPolicies {
    state: NodeStateWatch,
    pod: Arc<str>,
}

impl PodPolicies {
    /// The policies of the pod `namespace/name` in the node state `state` follows.
    pub fn new(state: NodeStateWatch, pod: &str) -> Self {
        Self {
            state,
            pod: Arc::from(pod),
        }
    }

    /// The policies in force now.
    pub fn current(&self) -> Vec<Arc<Policy>> {
        self.state.borrow().authorization.for_pod(&self.pod)
    }

    /// Resolves at the next version of the node state (with any pod's policies); never when
    /// no version can come any more.
    pub async fn changed(&mut self) {
        if self.state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
