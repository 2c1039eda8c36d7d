//! GRPCRoutes (Gateway API v1, attached to Services as in GAMMA), translated into the form
//! of an HTTPRoute, which the proxy already applies: a gRPC call is an HTTP/2 POST to
//! `/<package.Service>/<Method>`, so a method match is a path match.
//!
//! - `Exact` with a service and a method: the exact path `/<service>/<method>`;
//! - `Exact` with the service only: every method of it, the path prefix `/<service>`
//!   (element-wise, so not `/<service>Other/...`);
//! - `Exact` with the method only: the method of any service, `/[^/]+/<method>`;
//! - `RegularExpression`: `/(<service>)/(<method>)`, a missing one matching any name.
//!
//! An empty `service` or `method` is a missing one. Header matches, weighted backendRefs and
//! the header modifier filters are an HTTPRoute's. `RequestMirror` and `ExtensionRef` filters
//! are refused with the field named, like any route nodemesh cannot honour whole.
//!
//! Two things keep a GRPCRoute a GRPCRoute in the shared table: its matches apply to gRPC
//! calls only (`content-type: application/grpc`), so a rule without a method match does not
//! catch a Service's plain HTTP; and they are ranked by the GRPCRoute order (characters of an
//! exact service, then of an exact method, then header matches; a regular expression counts
//! no characters), ahead of any HTTPRoute's on the same Service ([`GrpcRank`]).

use super::{
    convert::{
        ConvertedRoute, RouteError, RouteKey, anchored, convert_spec, parse_spec, route_error,
    },
    rule::GrpcRank,
    spec::{GrpcMethodSpec, GrpcRouteSpec, MatchSpec, PathMatchSpec, RouteSpec, RuleSpec},
};
use crate::k8s::objects::GrpcRouteObject;

/// The filters a GRPCRoute rule may use here.
const SUPPORTED_FILTERS: [&str; 2] = ["RequestHeaderModifier", "ResponseHeaderModifier"];

/// Converts one GRPCRoute, naming the first field that is wrong.
pub(super) fn convert_grpc(
    namespace: &str,
    key: &RouteKey,
    object: &GrpcRouteObject,
) -> Result<ConvertedRoute, RouteError> {
    let spec: GrpcRouteSpec = parse_spec(key, &object.spec)?;
    let mut rules = Vec::with_capacity(spec.rules.len());
    let mut ranks: Vec<Vec<GrpcRank>> = Vec::with_capacity(spec.rules.len());
    for (r, rule) in spec.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let mut matches = Vec::with_capacity(rule.matches.len());
        let mut rule_ranks = Vec::with_capacity(rule.matches.len().max(1));
        for (m, grpc) in rule.matches.into_iter().enumerate() {
            let method_at = format!("{at}.matches[{m}].method");
            let (path, rank) = match grpc.method {
                Some(method) => {
                    let (path, rank) = method_path(&method, &method_at)
                        .map_err(|(f, m)| route_error(key, &f, m))?;
                    (Some(path), rank)
                }
                None => (None, GrpcRank::default()),
            };
            rule_ranks.push(rank);
            matches.push(MatchSpec {
                path,
                headers: grpc.headers,
                query_params: Vec::new(),
                method: None,
            });
        }
        if let Some((f, filter)) = rule
            .filters
            .iter()
            .enumerate()
            .find(|(_, filter)| !SUPPORTED_FILTERS.contains(&filter.kind.as_str()))
        {
            return Err(route_error(
                key,
                &format!("{at}.filters[{f}].type"),
                format!(
                    "{:?} is not supported on a GRPCRoute ({} are)",
                    filter.kind,
                    SUPPORTED_FILTERS.join(" and ")
                ),
            ));
        }
        if rule_ranks.is_empty() {
            // No matches: the one default match, every call.
            rule_ranks.push(GrpcRank::default());
        }
        ranks.push(rule_ranks);
        rules.push(RuleSpec {
            matches,
            filters: rule.filters,
            backend_refs: rule.backend_refs,
            timeouts: None,
            retry: None,
        });
    }
    let spec = RouteSpec {
        parent_refs: spec.parent_refs,
        rules,
    };
    let mut route = convert_spec(namespace, key, spec, &object.metadata)?;
    for ((matchers, _), rule_ranks) in route.rules.iter_mut().zip(ranks) {
        for (matcher, rank) in matchers.iter_mut().zip(rule_ranks) {
            matcher.grpc = Some(rank);
        }
    }
    Ok(route)
}

/// The path match for a method match at `at` and its rank, or the (field, message) that is
/// wrong.
fn method_path(
    method: &GrpcMethodSpec,
    at: &str,
) -> Result<(PathMatchSpec, GrpcRank), (String, String)> {
    // Empty is missing; the leading dot of a fully qualified name is not in the call's path.
    let service = method.service.as_deref().filter(|s| !s.is_empty());
    let name = method.method.as_deref().filter(|m| !m.is_empty());
    if service.is_none() && name.is_none() {
        return Err((
            at.to_owned(),
            "a method match needs a service, a method or both".to_owned(),
        ));
    }
    match method.kind.as_str() {
        "Exact" => {
            if let Some(service) = service
                && !is_service_name(service)
            {
                return Err((
                    format!("{at}.service"),
                    format!("{service:?} is not a gRPC service name (package.Service)"),
                ));
            }
            if let Some(name) = name
                && !is_method_name(name)
            {
                return Err((
                    format!("{at}.method"),
                    format!("{name:?} is not a gRPC method name"),
                ));
            }
            let service = service.map(|s| s.strip_prefix('.').unwrap_or(s));
            let rank = GrpcRank {
                service_chars: service.map_or(0, str::len),
                method_chars: name.map_or(0, str::len),
            };
            let (kind, value) = match (service, name) {
                (Some(service), Some(name)) => ("Exact", format!("/{service}/{name}")),
                (Some(service), None) => ("PathPrefix", format!("/{service}")),
                // Identifiers only (checked above): nothing to escape.
                (_, name) => (
                    "RegularExpression",
                    format!("/[^/]+/{}", name.unwrap_or("")),
                ),
            };
            let path = PathMatchSpec {
                kind: kind.to_owned(),
                value,
            };
            Ok((path, rank))
        }
        "RegularExpression" => {
            for (field, pattern) in [("service", service), ("method", name)] {
                if let Some(pattern) = pattern {
                    // Alone too: `a)|(b` is valid inside `^(?:…)$` but would break out of
                    // its group in the path's expression.
                    regex::Regex::new(pattern)
                        .map_err(|e| e.to_string())
                        .and_then(|_| anchored(pattern).map_err(|e| e.to_string()))
                        .map_err(|e| (format!("{at}.{field}"), e))?;
                }
            }
            let any = "[^/]+";
            let path = PathMatchSpec {
                kind: "RegularExpression".to_owned(),
                value: format!(
                    "/(?:{})/(?:{})",
                    service.unwrap_or(any),
                    name.unwrap_or(any)
                ),
            };
            Ok((path, GrpcRank::default()))
        }
        other => Err((
            format!("{at}.type"),
            format!("{other:?} (Exact or RegularExpression)"),
        )),
    }
}

/// `package.Service`: dot-separated identifiers, as the GRPCRoute schema has it.
fn is_service_name(name: &str) -> bool {
    let name = name.strip_prefix('.').unwrap_or(name);
    !name.is_empty() && name.split('.').all(is_identifier)
}

fn is_method_name(name: &str) -> bool {
    is_identifier(name)
}

fn is_identifier(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
