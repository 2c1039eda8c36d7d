//! The subset of the Gateway API v1 HTTPRoute and GRPCRoute specs that nodemesh reads, as
//! written in the cluster. `convert.rs` turns an HTTPRoute's into the form the proxy uses,
//! `grpc.rs` a GRPCRoute's into an HTTPRoute's first.
//!
//! Hand-written rather than the `gateway-api` crate's types: that crate's current release
//! (0.21) is built on kube 3 and k8s-openapi 0.27 while the agent is on kube 5, and its fully
//! typed spec would make a bad route fail at deserialization as a whole, where nodemesh names
//! the field that is wrong, reports it in the route's status and keeps the last good version.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RouteSpec {
    #[serde(default)]
    pub(super) parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    pub(super) rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ParentRefSpec {
    pub(super) group: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) name: String,
    pub(super) namespace: Option<String>,
    pub(super) port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RuleSpec {
    #[serde(default)]
    pub(super) matches: Vec<MatchSpec>,
    #[serde(default)]
    pub(super) filters: Vec<FilterSpec>,
    #[serde(default)]
    pub(super) backend_refs: Vec<BackendRefSpec>,
    pub(super) timeouts: Option<TimeoutsSpec>,
    pub(super) retry: Option<RetrySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MatchSpec {
    pub(super) path: Option<PathMatchSpec>,
    #[serde(default)]
    pub(super) headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub(super) query_params: Vec<ValueMatchSpec>,
    pub(super) method: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PathMatchSpec {
    #[serde(rename = "type", default = "path_prefix")]
    pub(super) kind: String,
    #[serde(default = "slash")]
    pub(super) value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
pub(super) struct ValueMatchSpec {
    #[serde(rename = "type", default = "exact")]
    pub(super) kind: String,
    pub(super) name: String,
    pub(super) value: String,
}

fn exact() -> String {
    "Exact".into()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FilterSpec {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) request_header_modifier: Option<HeaderModifierSpec>,
    pub(super) response_header_modifier: Option<HeaderModifierSpec>,
    pub(super) url_rewrite: Option<UrlRewriteSpec>,
    pub(super) request_redirect: Option<RedirectSpec>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct HeaderModifierSpec {
    #[serde(default)]
    pub(super) set: Vec<HeaderSpec>,
    #[serde(default)]
    pub(super) add: Vec<HeaderSpec>,
    #[serde(default)]
    pub(super) remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct HeaderSpec {
    pub(super) name: String,
    pub(super) value: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct UrlRewriteSpec {
    pub(super) hostname: Option<String>,
    pub(super) path: Option<PathModifierSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PathModifierSpec {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) replace_full_path: Option<String>,
    pub(super) replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RedirectSpec {
    pub(super) scheme: Option<String>,
    pub(super) hostname: Option<String>,
    pub(super) path: Option<PathModifierSpec>,
    pub(super) port: Option<u16>,
    pub(super) status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
pub(super) struct BackendRefSpec {
    pub(super) group: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) name: String,
    pub(super) namespace: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) weight: Option<i64>,
    /// Per-backend filters: refused (the rule's filters are supported).
    #[serde(default)]
    pub(super) filters: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TimeoutsSpec {
    pub(super) request: Option<String>,
    pub(super) backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RetrySpec {
    #[serde(default)]
    pub(super) codes: Vec<u16>,
    pub(super) attempts: Option<u32>,
    pub(super) backoff: Option<String>,
}

/// A GRPCRoute's spec (v1): the parents, filters and backends are an HTTPRoute's; a match
/// names a gRPC service and method instead of a path.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GrpcRouteSpec {
    #[serde(default)]
    pub(super) parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    pub(super) rules: Vec<GrpcRuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GrpcRuleSpec {
    #[serde(default)]
    pub(super) matches: Vec<GrpcMatchSpec>,
    #[serde(default)]
    pub(super) filters: Vec<FilterSpec>,
    #[serde(default)]
    pub(super) backend_refs: Vec<BackendRefSpec>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GrpcMatchSpec {
    pub(super) method: Option<GrpcMethodSpec>,
    #[serde(default)]
    pub(super) headers: Vec<ValueMatchSpec>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GrpcMethodSpec {
    #[serde(rename = "type", default = "exact")]
    pub(super) kind: String,
    pub(super) service: Option<String>,
    pub(super) method: Option<String>,
}
