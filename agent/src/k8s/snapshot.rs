//! The cluster state every source produces: what the agent knows about the cluster.
//!
//! The large kinds (every pod's address and identity, every Service's endpoints) live in
//! indices the source keeps current in place and the proxies read live ([`ClusterIndices`]);
//! the small kinds the reconciler recomputes from on each pass are in [`ClusterSnapshot`].

use std::collections::BTreeMap;

use super::{
    compact::{LocalPod, NamespaceInfo},
    objects::{AuthorizationPolicyObject, HttpRouteObject},
};
use crate::state::{
    services::{ServiceIndex, SharedServices},
    workloads::{SharedWorkloads, WorkloadIndex},
};

/// Namespaces by name (the last good version of each); this node's pods by `namespace/name`;
/// HTTPRoutes and nodemesh AuthorizationPolicies by (namespace, name).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub local_pods: BTreeMap<String, LocalPod>,
    pub http_routes: BTreeMap<(String, String), HttpRouteObject>,
    pub authorization_policies: BTreeMap<(String, String), AuthorizationPolicyObject>,
}

/// The indices a source keeps current event by event.
#[derive(Clone, Debug)]
pub struct ClusterIndices {
    /// Every pod that can own a meshed address, by address.
    pub workloads: SharedWorkloads,
    /// Every Service's virtual ports with their ready endpoints.
    pub services: SharedServices,
}

impl ClusterIndices {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            workloads: WorkloadIndex::shared(trust_domain),
            services: ServiceIndex::shared(),
        }
    }
}
