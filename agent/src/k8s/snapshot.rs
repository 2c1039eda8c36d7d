//! The cluster state every source produces: what the agent knows about the cluster.
//!
//! The large kinds (every pod's address and identity, every Service's endpoints) go into
//! indices the source keeps current in place and the proxies read live ([`ClusterIndices`]:
//! `state/` owns them, a source writes them through [`WorkloadStore`] and [`ServiceStore`]);
//! the small kinds the reconciler recomputes from on each pass are in [`ClusterSnapshot`].

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, RwLock},
};

use super::{
    compact::{LocalPod, NamespaceInfo, ServiceInfo, SliceInfo, WorkloadPod},
    objects::{AuthorizationPolicyObject, GrpcRouteObject, HttpRouteObject},
};

/// Namespaces by name (the last good version of each); this node's pods by `namespace/name`;
/// HTTPRoutes, GRPCRoutes and nodemesh AuthorizationPolicies by (namespace, name).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub local_pods: BTreeMap<String, LocalPod>,
    pub http_routes: BTreeMap<(String, String), HttpRouteObject>,
    pub grpc_routes: BTreeMap<(String, String), GrpcRouteObject>,
    pub authorization_policies: BTreeMap<(String, String), AuthorizationPolicyObject>,
}

/// The indices a source keeps current event by event.
#[derive(Clone)]
pub struct ClusterIndices {
    /// Every pod that can own a meshed address, by address.
    pub workloads: Arc<RwLock<dyn WorkloadStore>>,
    /// Every Service's virtual ports with their ready endpoints.
    pub services: Arc<RwLock<dyn ServiceStore>>,
}

/// Where a source writes every pod that can own a meshed address, and which namespaces are
/// in the mesh. A relist (`begin_relist`, every pod, `end_relist`) drops what it missed.
pub trait WorkloadStore: Send + Sync {
    fn begin_relist(&mut self);
    /// The pod at `key` (`namespace/name`) as it is now; None: it is gone.
    fn upsert(&mut self, key: &str, pod: Option<WorkloadPod>);
    fn end_relist(&mut self);
    fn set_meshed_namespaces(&mut self, namespaces: HashSet<String>);
    /// Pods held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a source writes every Service and EndpointSlice; Services and slices are relisted
/// apart, each dropping what its relist missed.
pub trait ServiceStore: Send + Sync {
    fn begin_service_relist(&mut self);
    /// The Service at `key` as it is now; None: it is gone.
    fn upsert_service(&mut self, key: &str, service: Option<ServiceInfo>);
    fn end_service_relist(&mut self);
    fn begin_slice_relist(&mut self);
    /// The EndpointSlice at `key` as it is now; None: it is gone.
    fn upsert_slice(&mut self, key: &str, slice: Option<SliceInfo>);
    fn end_slice_relist(&mut self);
    /// Services, virtual ports and ready endpoints held.
    fn counts(&self) -> (usize, usize, usize);
    /// Where this node is, and the region of every zone (its Nodes' labels).
    fn set_topology(&mut self, topology: Topology);
}

/// Where this node is, from the Nodes' labels `topology.kubernetes.io/{zone,region}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    pub node: Arc<str>,
    pub zone: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
    /// Each zone some Node is labelled with, and that Node's region.
    pub zone_regions: std::collections::BTreeMap<Arc<str>, Arc<str>>,
}

impl Topology {
    /// The node `node`, nowhere yet.
    pub fn new(node: &str) -> Self {
        Self {
            node: Arc::from(node),
            ..Self::default()
        }
    }

    /// Takes in one Node's zone and region labels: a Node with both says which region its
    /// zone is in; this node's (`local`) say where this node is. Zones are only ever added
    /// (a zone does not move between regions).
    pub fn observe(&mut self, local: bool, zone: Option<Arc<str>>, region: Option<Arc<str>>) {
        if let Some((zone, region)) = zone.as_ref().zip(region.as_ref()) {
            self.zone_regions
                .insert(Arc::clone(zone), Arc::clone(region));
        }
        if local {
            (self.zone, self.region) = (zone, region);
        }
    }
}
