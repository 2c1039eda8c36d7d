//! The workload index: which addresses belong to meshed pods anywhere in the cluster, their
//! identities and workload names. The outbound proxy asks it whether a destination gets
//! HBONE; both sides ask it who a peer is, for metrics and access logs.
//!
//! It holds every pod that can own a meshed address, in compact form, and is kept current
//! event by event by the cluster source (a pod event costs a few map operations, not a
//! rebuild): by `namespace/name` for updates, by address for lookups. Whether a pod's
//! namespace is meshed is checked at lookup, so labelling a namespace re-indexes nothing.
//! A relist (the source's `begin_relist` … `end_relist`) updates entries in place and then
//! drops those it did not mention, so memory never holds two copies of the cluster.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::peer::Peer;
use crate::{
    identity::spiffe::SpiffeId,
    k8s::{compact::WorkloadPod, snapshot::WorkloadStore},
};

/// The index as the proxies and the cluster source share it.
pub type SharedWorkloads = Arc<RwLock<WorkloadIndex>>;

/// One indexed pod with its identity (shared by every pod of its service account).
#[derive(Debug)]
struct Workload {
    pod: WorkloadPod,
    identity: Arc<SpiffeId>,
}

#[derive(Debug)]
struct Entry {
    workload: Arc<Workload>,
    /// The relist that last mentioned it.
    epoch: u64,
}

#[derive(Debug, Default)]
pub struct WorkloadIndex {
    trust_domain: String,
    by_key: HashMap<Arc<str>, Entry>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    meshed_namespaces: HashSet<String>,
    /// Identities by (namespace, service account); swept of unused ones as it grows.
    identities: HashMap<(Arc<str>, Arc<str>), Arc<SpiffeId>>,
    identities_sweep_at: usize,
    epoch: u64,
}

impl WorkloadIndex {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            ..Self::default()
        }
    }

    pub fn shared(trust_domain: &str) -> SharedWorkloads {
        Arc::new(RwLock::new(Self::new(trust_domain)))
    }

    /// The identity of the meshed pod that owns `ip`.
    pub fn identity_of(&self, ip: IpAddr) -> Option<&SpiffeId> {
        self.meshed(ip).map(|w| &*w.identity)
    }

    /// Who owns `ip`, for metrics: a meshed pod, or `unknown`.
    pub fn peer_of(&self, ip: IpAddr) -> Peer {
        self.meshed(ip).map_or_else(Peer::unknown, |w| Peer {
            workload: w.pod.workload.to_string(),
            namespace: w.pod.namespace.to_string(),
            principal: w.identity.to_string(),
        })
    }

    fn meshed(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip
            .get(&ip)
            .filter(|w| self.meshed_namespaces.contains(&*w.pod.namespace))
            .map(|w| &**w)
    }

    /// Pods indexed (in any namespace, meshed or not).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The namespaces labelled into the mesh.
    pub fn set_meshed_namespaces(&mut self, namespaces: HashSet<String>) {
        self.meshed_namespaces = namespaces;
    }

    /// Adds or replaces the pod `key` (`namespace/name`); None removes it (deleted, or no
    /// longer able to own a meshed address).
    pub fn upsert(&mut self, key: &str, pod: Option<WorkloadPod>) {
        self.remove(key);
        let Some(pod) = pod else {
            return;
        };
        let identity = match self.identity(&pod) {
            Ok(identity) => identity,
            Err(error) => {
                tracing::debug!(pod = key, %error, "no identity; not indexed");
                return;
            }
        };
        let workload = Arc::new(Workload { pod, identity });
        for ip in &workload.pod.ips {
            self.by_ip.insert(*ip, Arc::clone(&workload));
        }
        let key = Arc::clone(&workload.pod.key);
        self.by_key.insert(
            key,
            Entry {
                workload,
                epoch: self.epoch,
            },
        );
    }

    fn remove(&mut self, key: &str) {
        let Some(old) = self.by_key.remove(key) else {
            return;
        };
        for ip in &old.workload.pod.ips {
            // Another pod may hold the address by now (the event order of two pods).
            if self
                .by_ip
                .get(ip)
                .is_some_and(|w| Arc::ptr_eq(w, &old.workload))
            {
                self.by_ip.remove(ip);
            }
        }
    }

    /// A relist starts: what it does not mention by `end_relist` is gone.
    pub fn begin_relist(&mut self) {
        self.epoch += 1;
    }

    pub fn end_relist(&mut self) {
        let stale: Vec<Arc<str>> = self
            .by_key
            .iter()
            .filter(|(_, entry)| entry.epoch != self.epoch)
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in stale {
            self.remove(&key);
        }
        self.by_key.shrink_to_fit();
        self.by_ip.shrink_to_fit();
    }

    fn identity(
        &mut self,
        pod: &WorkloadPod,
    ) -> Result<Arc<SpiffeId>, crate::identity::spiffe::SpiffeIdError> {
        let key = (Arc::clone(&pod.namespace), Arc::clone(&pod.service_account));
        if let Some(identity) = self.identities.get(&key) {
            return Ok(Arc::clone(identity));
        }
        let identity = Arc::new(SpiffeId::new(
            &self.trust_domain,
            &pod.namespace,
            &pod.service_account,
        )?);
        self.identities.insert(key, Arc::clone(&identity));
        if self.identities.len() >= self.identities_sweep_at {
            self.identities.retain(|_, id| Arc::strong_count(id) > 1);
            self.identities_sweep_at = (self.identities.len() * 2).max(1024);
        }
        Ok(identity)
    }
}

/// A cluster source keeps the index current through this.
impl WorkloadStore for WorkloadIndex {
    fn begin_relist(&mut self) {
        WorkloadIndex::begin_relist(self);
    }
    fn upsert(&mut self, key: &str, pod: Option<WorkloadPod>) {
        WorkloadIndex::upsert(self, key, pod);
    }
    fn end_relist(&mut self) {
        WorkloadIndex::end_relist(self);
    }
    fn set_meshed_namespaces(&mut self, namespaces: HashSet<String>) {
        WorkloadIndex::set_meshed_namespaces(self, namespaces);
    }
    fn len(&self) -> usize {
        WorkloadIndex::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> WorkloadPod {
        WorkloadPod {
            key: format!("shop/{name}").into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node2".into(),
            workload: "web".into(),
            ips: [ip.parse().unwrap()].into(),
        }
    }

    #[test]
    fn lookups_follow_events_namespace_labels_and_relists() {
        let mut index = WorkloadIndex::new("cluster.local");
        let ip: IpAddr = "10.0.2.1".parse().unwrap();
        index.upsert("shop/a", Some(pod("a", "10.0.2.1")));
        assert_eq!(index.identity_of(ip), None, "shop is not meshed yet");
        index.set_meshed_namespaces(HashSet::from(["shop".to_owned()]));
        assert_eq!(
            index.identity_of(ip).map(ToString::to_string).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(index.peer_of(ip).workload, "web");

        // The address moves to another pod before the old pod's deletion arrives.
        index.upsert("shop/b", Some(pod("b", "10.0.2.1")));
        index.upsert("shop/a", None);
        assert!(index.identity_of(ip).is_some(), "b keeps the address");

        // A relist that no longer mentions b drops it.
        index.begin_relist();
        index.upsert("shop/c", Some(pod("c", "10.0.2.3")));
        index.end_relist();
        assert_eq!(index.identity_of(ip), None);
        assert_eq!(index.len(), 1);
    }
}
