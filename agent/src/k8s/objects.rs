//! The custom kinds the agent reads as they are written in the cluster: Gateway API
//! HTTPRoutes and GRPCRoutes (one generic [`RouteObject`]) and nodemesh
//! AuthorizationPolicies, with what kube-rs needs to watch them and the status update
//! written back to a route.
//!
//! Their specs stay raw JSON: `state::routes` and `state::authorization` convert them on each
//! rebuild and name the field that is wrong, keeping the last good version, where a typed
//! spec would make the watch drop a bad object as a whole. That is also why `Resource` is
//! implemented here by hand rather than with kube's `CustomResource` derive, which generates
//! the object around a typed spec struct (and needs kube's `derive` feature, which the agent
//! does not build); `spec.rs` in `state::routes` says why the `gateway-api` crate does not fit.

use std::{borrow::Cow, marker::PhantomData};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, core::NamespaceResourceScope};
use serde::Deserialize;

/// A Gateway API route as read from the cluster (an HTTPRoute or a GRPCRoute, by `K`): its
/// metadata and its spec, converted on each rebuild so that a bad spec is reported without
/// losing the rest of the state.
#[derive(Clone, Debug, Deserialize)]
#[serde(bound = "")]
pub struct RouteObject<K> {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
    /// What controllers (nodemesh among them) last reported about it.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
    #[serde(skip)]
    kind: PhantomData<K>,
}

impl<K> RouteObject<K> {
    pub fn new(metadata: ObjectMeta, spec: serde_json::Value) -> Self {
        Self {
            metadata,
            spec,
            status: None,
            kind: PhantomData,
        }
    }
}

/// Which Gateway API route kind a [`RouteObject`] is.
pub trait RouteKind: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// `HTTPRoute`, `GRPCRoute`.
    const KIND: &'static str;
    /// `httproutes`, `grpcroutes`.
    const PLURAL: &'static str;
}

#[derive(Clone, Debug)]
pub struct Http;
#[derive(Clone, Debug)]
pub struct Grpc;

impl RouteKind for Http {
    const KIND: &'static str = "HTTPRoute";
    const PLURAL: &'static str = "httproutes";
}

impl RouteKind for Grpc {
    const KIND: &'static str = "GRPCRoute";
    const PLURAL: &'static str = "grpcroutes";
}

/// An HTTPRoute (gateway.networking.k8s.io/v1).
pub type HttpRouteObject = RouteObject<Http>;
/// A GRPCRoute (gateway.networking.k8s.io/v1).
pub type GrpcRouteObject = RouteObject<Grpc>;

/// The status nodemesh reports for one route, when it differs from what the route carries.
#[derive(Debug, PartialEq)]
pub struct RouteStatusUpdate {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// The route's resourceVersion the update was computed from (a precondition).
    pub resource_version: Option<String>,
    /// The whole `status.parents` list: other controllers' entries kept, nodemesh's replaced.
    pub parents: Vec<serde_json::Value>,
}

/// An AuthorizationPolicy as read from the cluster, converted on each rebuild.
#[derive(Clone, Debug, Deserialize)]
pub struct AuthorizationPolicyObject {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

/// A route kind as kube-rs sees it; its spec is converted by `state::routes`, which reports
/// what is wrong with it.
impl<K: RouteKind> Resource for RouteObject<K> {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "gateway.networking.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// AuthorizationPolicy (nodemesh.io/v1alpha1), converted by `state::authorization`.
impl Resource for AuthorizationPolicyObject {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "AuthorizationPolicy".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "nodemesh.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "authorizationpolicies".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
