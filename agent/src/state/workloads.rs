//! The workload index: which addresses belong to meshed pods anywhere in the cluster, and
//! their identities. The outbound proxy asks it whether a destination gets HBONE.

use std::{collections::HashMap, net::IpAddr};

use super::membership;
use crate::{identity::spiffe::SpiffeId, k8s::cluster_state::ClusterSnapshot};

#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, SpiffeId>,
}

impl WorkloadIndex {
    pub fn build(snapshot: &ClusterSnapshot, trust_domain: &str) -> Self {
        let mut by_ip = HashMap::new();
        for pod in membership::meshed_pods(snapshot, None) {
            match SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account) {
                Ok(id) => {
                    for ip in &pod.ips {
                        by_ip.insert(*ip, id.clone());
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
        self.by_ip.get(&ip)
    }
}
