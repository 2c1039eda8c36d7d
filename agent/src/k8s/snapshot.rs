//! The cluster state every source produces: what the agent knows about the cluster.

use std::collections::BTreeMap;

use crate::state::{authorization::AuthorizationPolicyObject, routes::HttpRouteObject};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

/// Namespaces by name; Pods, Services, EndpointSlices, HTTPRoutes and nodemesh
/// AuthorizationPolicies by (namespace, name).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<(String, String), Pod>,
    pub services: BTreeMap<(String, String), Service>,
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    pub http_routes: BTreeMap<(String, String), HttpRouteObject>,
    pub authorization_policies: BTreeMap<(String, String), AuthorizationPolicyObject>,
}
