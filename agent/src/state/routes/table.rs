//! The route table: every converted route indexed by parent Service in Gateway API
//! precedence order, and the decision for one request.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{
    ServiceName,
    convert::{ConvertedRoute, RouteError, RouteKey, convert},
    grpc::convert_grpc,
    rule::{PathMatch, RequestMatch, RequestView, Rule},
};
use crate::k8s::objects::{Grpc, GrpcRouteObject, Http, HttpRouteObject, RouteKind};

/// One (match, rule) pair of one route, ordered by precedence.
#[derive(Debug)]
struct Entry {
    route: Arc<str>,
    port: Option<u16>,
    /// For consumer routes: the namespace whose clients it applies to.
    consumer: Option<String>,
    matcher: RequestMatch,
    rule: Arc<Rule>,
}

pub enum RouteDecision<'a> {
    /// No route is attached to the Service: forward to the Service itself.
    Unrouted,
    /// Routes are attached but none matches: 404.
    NoMatch,
    Matched {
        route: &'a str,
        matcher: &'a RequestMatch,
        rule: &'a Arc<Rule>,
    },
}

/// Routes by parent Service, each list in precedence order.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_service: HashMap<ServiceName, Vec<Entry>>,
    /// Converted routes by kind and `namespace/name`, the last good version of each.
    converted: BTreeMap<RouteKey, Arc<ConvertedRoute>>,
}

/// A route as the config dump shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RouteView {
    /// `namespace/name` (`GRPCRoute namespace/name` for a GRPCRoute).
    pub route: String,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub parents: Vec<String>,
    pub rules: usize,
}

impl RouteTable {
    /// Converts every route; a route that fails keeps its version from `previous`.
    pub fn build(
        http: &BTreeMap<(String, String), HttpRouteObject>,
        grpc: &BTreeMap<(String, String), GrpcRouteObject>,
        previous: &RouteTable,
    ) -> (Self, Vec<RouteError>) {
        let mut errors = Vec::new();
        let mut converted = BTreeMap::new();
        let mut add = |key: RouteKey, result: Result<ConvertedRoute, RouteError>| match result {
            Ok(route) => {
                converted.insert(key, Arc::new(route));
            }
            Err(error) => {
                errors.push(error);
                if let Some(good) = previous.converted.get(&key) {
                    converted.insert(key, Arc::clone(good));
                }
            }
        };
        for ((namespace, name), object) in http {
            let key = route_key::<Http>(namespace, name);
            let result = convert(namespace, &key, object);
            add(key, result);
        }
        for ((namespace, name), object) in grpc {
            let key = route_key::<Grpc>(namespace, name);
            let result = convert_grpc(namespace, &key, object);
            add(key, result);
        }
        (Self::index(converted), errors)
    }

    fn index(converted: BTreeMap<RouteKey, Arc<ConvertedRoute>>) -> Self {
        let mut by_service: HashMap<ServiceName, Vec<(Entry, Precedence)>> = HashMap::new();
        for (key, route) in &converted {
            let label: Arc<str> = Arc::from(key.label());
            for (service, port) in &route.parents {
                let service_namespace = service.split('/').next().unwrap_or_default();
                let consumer =
                    (service_namespace != route.namespace).then(|| route.namespace.clone());
                for (rule_index, (matches, rule)) in route.rules.iter().enumerate() {
                    for matcher in matches {
                        let precedence = Precedence::of(matcher, route, key, rule_index);
                        let entry = Entry {
                            route: Arc::clone(&label),
                            port: *port,
                            consumer: consumer.clone(),
                            matcher: matcher.clone_match(),
                            rule: Arc::clone(rule),
                        };
                        by_service
                            .entry(service.clone())
                            .or_default()
                            .push((entry, precedence));
                    }
                }
            }
        }
        let by_service = by_service
            .into_iter()
            .map(|(service, mut entries)| {
                entries.sort_by(|a, b| a.1.cmp(&b.1));
                (service, entries.into_iter().map(|(e, _)| e).collect())
            })
            .collect();
        Self {
            by_service,
            converted,
        }
    }

    /// What to do with `request`, sent by a client in `client_namespace` to `service:port`.
    pub fn decide(
        &self,
        service: &str,
        port: u16,
        client_namespace: &str,
        request: &RequestView<'_>,
    ) -> RouteDecision<'_> {
        let Some(entries) = self.by_service.get(service) else {
            return RouteDecision::Unrouted;
        };
        let applies = |entry: &&Entry| entry.port.is_none_or(|p| p == port);
        let consumer_routes = entries
            .iter()
            .filter(applies)
            .any(|e| e.consumer.as_deref() == Some(client_namespace));
        let mut candidates = entries.iter().filter(applies).filter(|e| {
            if consumer_routes {
                e.consumer.as_deref() == Some(client_namespace)
            } else {
                e.consumer.is_none()
            }
        });
        let mut any = false;
        for entry in candidates.by_ref() {
            any = true;
            if entry.matcher.matches(request) {
                return RouteDecision::Matched {
                    route: &entry.route,
                    matcher: &entry.matcher,
                    rule: &entry.rule,
                };
            }
        }
        if any {
            RouteDecision::NoMatch
        } else {
            RouteDecision::Unrouted
        }
    }

    pub fn views(&self) -> Vec<RouteView> {
        self.converted
            .iter()
            .map(|(key, route)| RouteView {
                route: key.label(),
                kind: key.kind,
                parents: route
                    .parents
                    .iter()
                    .map(|(service, port)| match port {
                        Some(port) => format!("{service}:{port}"),
                        None => service.clone(),
                    })
                    .collect(),
                rules: route.rules.len(),
            })
            .collect()
    }
}

/// Gateway API precedence, smallest first. A GRPCRoute's matches (which apply to gRPC calls
/// only) come before an HTTPRoute's and are ordered among themselves by the GRPCRoute rule:
/// characters of an exact service, then of an exact method, then header matches.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 0 for a GRPCRoute's match, 1 for an HTTPRoute's.
    kind: u8,
    grpc_service: std::cmp::Reverse<usize>,
    grpc_method: std::cmp::Reverse<usize>,
    /// 0 exact, 1 prefix, 2 regex (an HTTPRoute's; 0 for a GRPCRoute's).
    path_kind: u8,
    /// Longer prefixes first.
    path_len: std::cmp::Reverse<usize>,
    no_method: bool,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    created: String,
    route: String,
    rule: usize,
}

impl Precedence {
    fn of(matcher: &RequestMatch, route: &ConvertedRoute, key: &RouteKey, rule: usize) -> Self {
        let (path_kind, path_len) = match (&matcher.grpc, &matcher.path) {
            (Some(_), _) => (0, 0),
            (None, PathMatch::Exact(p)) => (0, p.len()),
            (None, PathMatch::Prefix(p)) => (1, p.len()),
            (None, PathMatch::Regex(r)) => (2, r.as_str().len()),
        };
        let rank = matcher.grpc.unwrap_or_default();
        Self {
            kind: u8::from(matcher.grpc.is_none()),
            grpc_service: std::cmp::Reverse(rank.service_chars),
            grpc_method: std::cmp::Reverse(rank.method_chars),
            path_kind,
            path_len: std::cmp::Reverse(path_len),
            no_method: matcher.method.is_none(),
            headers: std::cmp::Reverse(matcher.headers.len()),
            query: std::cmp::Reverse(matcher.query.len()),
            // RFC 3339 timestamps sort as strings; routes without one sort last.
            created: route.created.clone().unwrap_or_else(|| "~".into()),
            route: key.name.clone(),
            rule,
        }
    }
}

/// The key of the route `namespace/name` of kind `K`.
pub(super) fn route_key<K: RouteKind>(namespace: &str, name: &str) -> RouteKey {
    RouteKey {
        kind: K::KIND,
        name: format!("{namespace}/{name}"),
    }
}
