//! The workload index: which addresses belong to meshed pods anywhere in the cluster, their
//! identities and workload names. The outbound proxy asks it whether a destination gets
//! HBONE; both sides ask it who a peer is, for metrics and access logs.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use super::membership;
use crate::{
    identity::spiffe::SpiffeId, k8s::cluster_state::ClusterSnapshot, telemetry::metrics::Peer,
};

/// The index as the proxies share it, replaced whole on every change in the cluster.
pub type SharedWorkloads = Arc<RwLock<Arc<WorkloadIndex>>>;

#[derive(Debug)]
struct Workload {
    identity: SpiffeId,
    peer: Peer,
}

#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Workload>,
}

impl WorkloadIndex {
    pub fn build(snapshot: &ClusterSnapshot, trust_domain: &str) -> Self {
        let mut by_ip = HashMap::new();
        for pod in membership::meshed_pods(snapshot, None) {
            match SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account) {
                Ok(identity) => {
                    let peer = Peer {
                        workload: pod.workload.clone(),
                        namespace: pod.namespace.clone(),
                        principal: identity.to_string(),
                    };
                    for ip in &pod.ips {
                        by_ip.insert(
                            *ip,
                            Workload {
                                identity: identity.clone(),
                                peer: peer.clone(),
                            },
                        );
                    }
                }
                Err(error) => {
                    tracing::debug!(pod = %pod.display_name(), %error, "no identity; not indexed")
                }
            }
        }
        Self { by_ip }
    }

    /// The identity of the meshed pod that owns `ip`.
    pub fn identity_of(&self, ip: IpAddr) -> Option<&SpiffeId> {
        self.by_ip.get(&ip).map(|w| &w.identity)
    }

    /// Who owns `ip`, for metrics: a meshed pod, or `unknown`.
    pub fn peer_of(&self, ip: IpAddr) -> Peer {
        self.by_ip
            .get(&ip)
            .map_or_else(Peer::unknown, |w| w.peer.clone())
    }
}
