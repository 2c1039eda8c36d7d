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
//! Header matches, weighted backendRefs and the header modifier filters are an HTTPRoute's.
//! `RequestMirror` and `ExtensionRef` filters are refused with the field named, like any
//! route nodemesh cannot honour whole. Precedence is then the HTTPRoute order, which is the
//! GRPCRoute one for Services: an exact method before a whole service, before a regular
//! expression, and more header matches first.

use super::{
    convert::{ConvertedRoute, RouteError, RouteKey, anchored, convert_spec, parse_spec},
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
    let error = |field: String, message: String| RouteError {
        route: key.clone(),
        field,
        message,
    };
    let spec: GrpcRouteSpec = parse_spec(key, &object.spec)?;
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (r, rule) in spec.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let mut matches = Vec::with_capacity(rule.matches.len());
        for (m, grpc) in rule.matches.into_iter().enumerate() {
            let method_at = format!("{at}.matches[{m}].method");
            let path = grpc
                .method
                .map(|method| method_path(&method, &method_at).map_err(|(f, m)| error(f, m)))
                .transpose()?;
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
            return Err(error(
                format!("{at}.filters[{f}].type"),
                format!(
                    "{:?} is not supported on a GRPCRoute ({} are)",
                    filter.kind,
                    SUPPORTED_FILTERS.join(" and ")
                ),
            ));
        }
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
    convert_spec(namespace, key, spec, &object.metadata)
}

/// The path match for a method match at `at`, or the (field, message) that is wrong.
fn method_path(method: &GrpcMethodSpec, at: &str) -> Result<PathMatchSpec, (String, String)> {
    let service = method.service.as_deref();
    let name = method.method.as_deref();
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
            let (kind, value) = match (service, name) {
                (Some(service), Some(name)) => ("Exact", format!("/{service}/{name}")),
                (Some(service), None) => ("PathPrefix", format!("/{service}")),
                (None, Some(name)) => ("RegularExpression", format!("/[^/]+/{name}")),
                (None, None) => {
                    return Err((
                        at.to_owned(),
                        "an Exact method match needs a service, a method or both".to_owned(),
                    ));
                }
            };
            Ok(PathMatchSpec {
                kind: kind.to_owned(),
                value,
            })
        }
        "RegularExpression" => {
            for (field, pattern) in [("service", service), ("method", name)] {
                if let Some(pattern) = pattern {
                    anchored(pattern).map_err(|e| (format!("{at}.{field}"), e.to_string()))?;
                }
            }
            let any = "[^/]+";
            Ok(PathMatchSpec {
                kind: "RegularExpression".to_owned(),
                value: format!(
                    "/(?:{})/(?:{})",
                    service.unwrap_or(any),
                    name.unwrap_or(any)
                ),
            })
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
