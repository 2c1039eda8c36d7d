//! Gateway API HTTPRoutes attached to Services (GAMMA): what the L7 proxy does with each
//! HTTP request addressed to a Service.
//!
//! A route applies to a Service when one of its `parentRefs` names it (`kind: Service`,
//! group `""`), optionally on one port. Routes in the Service's namespace (producer routes)
//! apply to every client; routes in another namespace (consumer routes) apply only to clients
//! in that namespace, and replace the producer routes for them. Requests are matched against
//! every rule of every applicable route in Gateway API precedence order: exact path before
//! prefix, longer prefix first, then method, more header matches, more query matches, then
//! the older route, then `namespace/name`, then rule order. A Service with routes where no
//! rule matches answers 404; a Service without routes forwards to itself.
//!
//! Conversion is strict: an invalid route (a bad regex, a backend in another namespace, a
//! malformed duration, an unknown filter) is reported with the field that is wrong, and the
//! last version of that route that converted keeps serving.
//!
//! In cluster mode the outcome is written back to each route's `status.parents` under the
//! controller name `nodemesh.io/mesh`: `Accepted` (False with the error when the route does not
//! convert) and `ResolvedRefs` (False when a backend Service does not exist).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use hyper::{
    Method,
    header::{HeaderName, HeaderValue},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use regex::Regex;
use serde::Deserialize;

/// `namespace/name` of a Service.
pub type ServiceName = String;

/// An HTTPRoute as read from the cluster: its metadata and its spec, converted on each
/// rebuild so that a bad spec is reported without losing the rest of the state.
#[derive(Clone, Debug, Deserialize)]
pub struct HttpRouteObject {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
    /// What controllers (nodemesh among them) last reported about it.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// The controller name nodemesh reports route status under.
pub const CONTROLLER_NAME: &str = "nodemesh.io/mesh";

/// The status nodemesh reports for one route, when it differs from what the route carries.
#[derive(Debug, PartialEq)]
pub struct RouteStatusUpdate {
    pub namespace: String,
    pub name: String,
    /// The route's resourceVersion the update was computed from (a precondition).
    pub resource_version: Option<String>,
    /// The whole `status.parents` list: other controllers' entries kept, nodemesh's replaced.
    pub parents: Vec<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
#[error("HTTPRoute {route}: {field}: {message}")]
pub struct RouteError {
    pub route: String,
    pub field: String,
    pub message: String,
}

// ---- The subset of the Gateway API v1 HTTPRoute spec that nodemesh reads. ----

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParentRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleSpec {
    #[serde(default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    filters: Vec<FilterSpec>,
    #[serde(default)]
    backend_refs: Vec<BackendRefSpec>,
    timeouts: Option<TimeoutsSpec>,
    retry: Option<RetrySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MatchSpec {
    path: Option<PathMatchSpec>,
    #[serde(default)]
    headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    query_params: Vec<ValueMatchSpec>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PathMatchSpec {
    #[serde(rename = "type", default = "path_prefix")]
    kind: String,
    #[serde(default = "slash")]
    value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
struct ValueMatchSpec {
    #[serde(rename = "type", default = "exact")]
    kind: String,
    name: String,
    value: String,
}

fn exact() -> String {
    "Exact".into()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FilterSpec {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModifierSpec>,
    response_header_modifier: Option<HeaderModifierSpec>,
    url_rewrite: Option<UrlRewriteSpec>,
    request_redirect: Option<RedirectSpec>,
}

#[derive(Debug, Default, Deserialize)]
struct HeaderModifierSpec {
    #[serde(default)]
    set: Vec<HeaderSpec>,
    #[serde(default)]
    add: Vec<HeaderSpec>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct HeaderSpec {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
struct UrlRewriteSpec {
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathModifierSpec {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
    port: Option<u16>,
    status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct BackendRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutsSpec {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RetrySpec {
    #[serde(default)]
    codes: Vec<u16>,
    attempts: Option<u32>,
    backoff: Option<String>,
}

// ---- The converted form the proxy uses. ----

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/a` matches `/a` and `/a/b`, not `/ab`.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(expected) => value == expected,
            Self::Regex(regex) => regex.is_match(value),
        }
    }
}

#[derive(Debug)]
pub struct RequestMatch {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<Method>,
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut hyper::HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug)]
pub struct UrlRewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub service: ServiceName,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

#[derive(Debug, Default)]
pub struct Rule {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub rewrite: Option<UrlRewrite>,
    pub redirect: Option<Redirect>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

impl Rule {
    /// A backend drawn by weight with `draw` uniform in `0..total_weight`; None when every
    /// weight is zero (Gateway API: such a rule answers 500).
    pub fn backend(&self, draw: u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = draw % total;
        for backend in &self.backends {
            let weight = u64::from(backend.weight);
            if point < weight {
                return Some(backend);
            }
            point -= weight;
        }
        None
    }
}

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

/// The request as routing sees it.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a hyper::HeaderMap,
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
    /// Converted routes by `namespace/name`, the last good version of each.
    converted: BTreeMap<String, Arc<ConvertedRoute>>,
}

#[derive(Debug)]
struct ConvertedRoute {
    namespace: String,
    created: Option<String>,
    parents: Vec<(ServiceName, Option<u16>)>,
    rules: Vec<(Vec<RequestMatch>, Arc<Rule>)>,
}

/// A route as the config dump shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RouteView {
    pub route: String,
    pub parents: Vec<String>,
    pub rules: usize,
}

impl RouteTable {
    /// Converts every route; a route that fails keeps its version from `previous`.
    pub fn build(
        routes: &BTreeMap<(String, String), HttpRouteObject>,
        previous: &RouteTable,
    ) -> (Self, Vec<RouteError>) {
        let mut errors = Vec::new();
        let mut converted = BTreeMap::new();
        for ((namespace, name), object) in routes {
            let key = format!("{namespace}/{name}");
            match convert(namespace, &key, object) {
                Ok(route) => {
                    converted.insert(key, Arc::new(route));
                }
                Err(error) => {
                    errors.push(error);
                    if let Some(good) = previous.converted.get(&key) {
                        converted.insert(key, Arc::clone(good));
                    }
                }
            }
        }
        (Self::index(converted), errors)
    }

    fn index(converted: BTreeMap<String, Arc<ConvertedRoute>>) -> Self {
        let mut by_service: HashMap<ServiceName, Vec<(Entry, Precedence)>> = HashMap::new();
        for (key, route) in &converted {
            for (service, port) in &route.parents {
                let service_namespace = service.split('/').next().unwrap_or_default();
                let consumer =
                    (service_namespace != route.namespace).then(|| route.namespace.clone());
                for (rule_index, (matches, rule)) in route.rules.iter().enumerate() {
                    for matcher in matches {
                        let precedence = Precedence::of(matcher, route, key, rule_index);
                        let entry = Entry {
                            route: Arc::from(key.as_str()),
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
                route: key.clone(),
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

/// The status each route should carry for its Service parents (Accepted, ResolvedRefs), for
/// the routes whose current status says something else. `errors` are this rebuild's
/// conversion errors; `service_exists` says whether `namespace/name` is a Service.
pub fn status_updates(
    routes: &BTreeMap<(String, String), HttpRouteObject>,
    errors: &[RouteError],
    service_exists: impl Fn(&str) -> bool,
    now: &str,
) -> Vec<RouteStatusUpdate> {
    let mut updates = Vec::new();
    for ((namespace, name), object) in routes {
        let key = format!("{namespace}/{name}");
        let error = errors.iter().find(|e| e.route == key);
        let parents = service_parents(&object.spec);
        if parents.is_empty() {
            continue;
        }
        let (accepted, accepted_reason, accepted_message) = match error {
            Some(error) => (
                "False",
                "UnsupportedValue",
                format!(
                    "{}: {}; the last accepted version of this route keeps serving",
                    error.field, error.message
                ),
            ),
            None => ("True", "Accepted", "accepted by nodemesh".to_owned()),
        };
        let missing: Vec<String> = backend_services(&object.spec, namespace)
            .into_iter()
            .filter(|service| !service_exists(service))
            .collect();
        let (resolved, resolved_reason, resolved_message) = if missing.is_empty() {
            ("True", "ResolvedRefs", "all backends resolved".to_owned())
        } else {
            (
                "False",
                "BackendNotFound",
                format!("no such Service: {}", missing.join(", ")),
            )
        };
        let generation = object.metadata.generation;
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            serde_json::json!({
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now,
            })
        };
        let ours: Vec<serde_json::Value> = parents
            .into_iter()
            .map(|parent_ref| {
                serde_json::json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        condition("Accepted", accepted, accepted_reason, &accepted_message),
                        condition("ResolvedRefs", resolved, resolved_reason, &resolved_message),
                    ],
                })
            })
            .collect();
        let current: Vec<serde_json::Value> = object
            .status
            .as_ref()
            .and_then(|s| s.get("parents"))
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default();
        let current_ours: Vec<&serde_json::Value> = current
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .collect();
        let unchanged = current_ours.len() == ours.len()
            && current_ours
                .iter()
                .zip(&ours)
                .all(|(a, b)| same_ignoring_time(a, b));
        if unchanged {
            continue;
        }
        let mut parents: Vec<serde_json::Value> = current
            .into_iter()
            .filter(|p| p["controllerName"] != CONTROLLER_NAME)
            .collect();
        parents.extend(ours);
        updates.push(RouteStatusUpdate {
            namespace: namespace.clone(),
            name: name.clone(),
            resource_version: object.metadata.resource_version.clone(),
            parents,
        });
    }
    updates
}

/// Equal once every `lastTransitionTime` is left out.
fn same_ignoring_time(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    fn strip(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => map
                .iter()
                .filter(|(k, _)| *k != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
            serde_json::Value::Array(items) => items.iter().map(strip).collect(),
            other => other.clone(),
        }
    }
    strip(a) == strip(b)
}

/// The route's Service parentRefs as written (read leniently: status must be reported for
/// routes whose spec does not convert, too).
fn service_parents(spec: &serde_json::Value) -> Vec<serde_json::Value> {
    spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "Service" && p["group"].as_str().unwrap_or("").is_empty())
        .cloned()
        .collect()
}

/// `namespace/name` of every Service the route's rules send to.
fn backend_services(spec: &serde_json::Value, namespace: &str) -> Vec<String> {
    let mut services: Vec<String> = spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["backendRefs"].as_array().into_iter().flatten())
        .filter(|b| b["kind"].as_str().unwrap_or("Service") == "Service")
        .filter_map(|b| {
            let name = b["name"].as_str()?;
            let ns = b["namespace"].as_str().unwrap_or(namespace);
            Some(format!("{ns}/{name}"))
        })
        .collect();
    services.sort();
    services.dedup();
    services
}

/// Gateway API precedence, smallest first.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 0 exact, 1 prefix, 2 regex.
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
    fn of(matcher: &RequestMatch, route: &ConvertedRoute, key: &str, rule: usize) -> Self {
        let (path_kind, path_len) = match &matcher.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Regex(r) => (2, r.as_str().len()),
        };
        Self {
            path_kind,
            path_len: std::cmp::Reverse(path_len),
            no_method: matcher.method.is_none(),
            headers: std::cmp::Reverse(matcher.headers.len()),
            query: std::cmp::Reverse(matcher.query.len()),
            // RFC 3339 timestamps sort as strings; routes without one sort last.
            created: route.created.clone().unwrap_or_else(|| "~".into()),
            route: key.to_owned(),
            rule,
        }
    }
}

impl RequestMatch {
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => request.path == p,
            PathMatch::Prefix(p) => prefix_matches(p, request.path),
            PathMatch::Regex(r) => r.is_match(request.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|(name, matcher)| {
                request
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| matcher.matches(v)))
            })
            && self.query.iter().all(|(name, matcher)| {
                query_pairs(request.query).any(|(n, v)| n == name && matcher.matches(v))
            })
    }

    fn clone_match(&self) -> Self {
        let clone_value = |m: &ValueMatch| match m {
            ValueMatch::Exact(s) => ValueMatch::Exact(s.clone()),
            ValueMatch::Regex(r) => ValueMatch::Regex(r.clone()),
        };
        Self {
            path: match &self.path {
                PathMatch::Exact(p) => PathMatch::Exact(p.clone()),
                PathMatch::Prefix(p) => PathMatch::Prefix(p.clone()),
                PathMatch::Regex(r) => PathMatch::Regex(r.clone()),
            },
            headers: self
                .headers
                .iter()
                .map(|(n, m)| (n.clone(), clone_value(m)))
                .collect(),
            query: self
                .query
                .iter()
                .map(|(n, m)| (n.clone(), clone_value(m)))
                .collect(),
            method: self.method.clone(),
        }
    }

    /// The path after a URL rewrite or redirect `modifier` applied under this match.
    pub fn rewrite_path(&self, modifier: &PathModifier, path: &str) -> String {
        match modifier {
            PathModifier::ReplaceFullPath(full) => full.clone(),
            PathModifier::ReplacePrefixMatch(replacement) => match &self.path {
                PathMatch::Prefix(prefix) if prefix_matches(prefix, path) => {
                    let rest = &path[prefix.trim_end_matches('/').len()..];
                    let base = replacement.trim_end_matches('/');
                    match (base.is_empty(), rest.is_empty()) {
                        (true, true) => "/".to_owned(),
                        (true, false) => rest.to_owned(),
                        (false, _) => format!("{base}{rest}"),
                    }
                }
                _ => path.to_owned(),
            },
        }
    }
}

/// Gateway API prefix matching is by path element.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Gateway API durations: 1–4 groups of a number and a unit (h, m, s, ms), e.g. `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a Gateway API duration (e.g. 500ms, 10s, 1m30s)");
    let mut total = Duration::ZERO;
    let mut rest = text;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(number).map_err(|_| bad())?;
        groups += 1;
    }
    if groups == 0 || groups > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// Converts one route, naming the first field that is wrong.
fn convert(
    namespace: &str,
    key: &str,
    object: &HttpRouteObject,
) -> Result<ConvertedRoute, RouteError> {
    let error = |field: &str, message: String| RouteError {
        route: key.to_owned(),
        field: field.to_owned(),
        message,
    };
    let spec: RouteSpec = serde_path_to_error::deserialize(&object.spec).map_err(|e| {
        let field = match e.path().to_string().as_str() {
            "." => "spec".to_owned(),
            path => format!("spec.{path}"),
        };
        error(&field, e.into_inner().to_string())
    })?;
    let mut parents = Vec::new();
    for (i, parent) in spec.parent_refs.iter().enumerate() {
        let is_service = parent.kind.as_deref() == Some("Service")
            && parent.group.as_deref().unwrap_or("").is_empty();
        if !is_service {
            // A Gateway parent: not the mesh's business.
            continue;
        }
        let parent_namespace = parent.namespace.as_deref().unwrap_or(namespace);
        if parent.name.is_empty() {
            return Err(error(&format!("spec.parentRefs[{i}].name"), "empty".into()));
        }
        parents.push((format!("{parent_namespace}/{}", parent.name), parent.port));
    }
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().enumerate() {
        let field = |rest: &str| format!("spec.rules[{r}]{rest}");
        let matches = if rule.matches.is_empty() {
            vec![convert_match(
                &MatchSpec::default(),
                &field(".matches[0]"),
                key,
            )?]
        } else {
            rule.matches
                .iter()
                .enumerate()
                .map(|(m, spec)| convert_match(spec, &field(&format!(".matches[{m}]")), key))
                .collect::<Result<_, _>>()?
        };
        let mut converted = Rule::default();
        for (f, filter) in rule.filters.iter().enumerate() {
            let at = field(&format!(".filters[{f}]"));
            let missing = |what: &str| error(&at, format!("type {} without `{what}`", filter.kind));
            match filter.kind.as_str() {
                "RequestHeaderModifier" => {
                    let spec = filter
                        .request_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("requestHeaderModifier"))?;
                    converted.request_headers = Some(convert_modifier(spec, &at, key)?);
                }
                "ResponseHeaderModifier" => {
                    let spec = filter
                        .response_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("responseHeaderModifier"))?;
                    converted.response_headers = Some(convert_modifier(spec, &at, key)?);
                }
                "URLRewrite" => {
                    let spec = filter
                        .url_rewrite
                        .as_ref()
                        .ok_or_else(|| missing("urlRewrite"))?;
                    converted.rewrite = Some(UrlRewrite {
                        hostname: spec
                            .hostname
                            .as_deref()
                            .map(|h| {
                                HeaderValue::from_str(h)
                                    .map_err(|_| error(&at, format!("hostname {h:?} is invalid")))
                            })
                            .transpose()?,
                        path: spec
                            .path
                            .as_ref()
                            .map(|p| convert_path_modifier(p, &at, key))
                            .transpose()?,
                    });
                }
                "RequestRedirect" => {
                    let spec = filter
                        .request_redirect
                        .as_ref()
                        .ok_or_else(|| missing("requestRedirect"))?;
                    let status = spec.status_code.unwrap_or(302);
                    if status != 301 && status != 302 {
                        return Err(error(
                            &format!("{at}.requestRedirect.statusCode"),
                            format!("{status} (must be 301 or 302)"),
                        ));
                    }
                    converted.redirect = Some(Redirect {
                        scheme: spec.scheme.clone(),
                        hostname: spec.hostname.clone(),
                        path: spec
                            .path
                            .as_ref()
                            .map(|p| convert_path_modifier(p, &at, key))
                            .transpose()?,
                        port: spec.port,
                        status,
                    });
                }
                other => {
                    return Err(error(
                        &format!("{at}.type"),
                        format!(
                            "{other:?} is not supported (RequestHeaderModifier, \
                             ResponseHeaderModifier, URLRewrite, RequestRedirect are)"
                        ),
                    ));
                }
            }
        }
        if converted.redirect.is_some() && converted.rewrite.is_some() {
            return Err(error(
                &field(".filters"),
                "RequestRedirect and URLRewrite cannot be used together".into(),
            ));
        }
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            let at = field(&format!(".backendRefs[{b}]"));
            let kind = backend.kind.as_deref().unwrap_or("Service");
            if kind != "Service" || !backend.group.as_deref().unwrap_or("").is_empty() {
                return Err(error(
                    &format!("{at}.kind"),
                    format!("{kind:?}: only core Services can be backends"),
                ));
            }
            let backend_namespace = backend.namespace.as_deref().unwrap_or(namespace);
            if backend_namespace != namespace {
                return Err(error(
                    &format!("{at}.namespace"),
                    format!(
                        "{backend_namespace:?}: backends in another namespace need a \
                         ReferenceGrant, which nodemesh does not support yet"
                    ),
                ));
            }
            let port = backend.port.ok_or_else(|| {
                error(
                    &format!("{at}.port"),
                    "required for a Service backend".into(),
                )
            })?;
            let weight = backend.weight.unwrap_or(1);
            let weight = u32::try_from(weight)
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| {
                    error(
                        &format!("{at}.weight"),
                        format!("{weight} (must be 0..=1000000)"),
                    )
                })?;
            converted.backends.push(Backend {
                service: format!("{backend_namespace}/{}", backend.name),
                port,
                weight,
            });
        }
        if let Some(timeouts) = &rule.timeouts {
            let duration = |text: &Option<String>, name: &str| {
                text.as_deref()
                    .map(|t| {
                        parse_duration(t)
                            .map_err(|m| error(&field(&format!(".timeouts.{name}")), m))
                    })
                    .transpose()
            };
            converted.request_timeout = duration(&timeouts.request, "request")?;
            converted.backend_timeout = duration(&timeouts.backend_request, "backendRequest")?;
            if let (Some(request), Some(backend)) =
                (converted.request_timeout, converted.backend_timeout)
                && backend > request
            {
                return Err(error(
                    &field(".timeouts.backendRequest"),
                    "longer than timeouts.request".into(),
                ));
            }
        }
        if let Some(retry) = &rule.retry {
            let backoff = retry
                .backoff
                .as_deref()
                .map(|b| parse_duration(b).map_err(|m| error(&field(".retry.backoff"), m)))
                .transpose()?
                .unwrap_or(Duration::from_millis(25));
            if let Some(code) = retry.codes.iter().find(|c| !(500..600).contains(*c)) {
                return Err(error(
                    &field(".retry.codes"),
                    format!("{code} (only 5xx codes are retried)"),
                ));
            }
            converted.retry = Some(Retry {
                attempts: retry.attempts.unwrap_or(1).min(10),
                codes: if retry.codes.is_empty() {
                    vec![503]
                } else {
                    retry.codes.clone()
                },
                backoff,
            });
        }
        rules.push((matches, Arc::new(converted)));
    }
    Ok(ConvertedRoute {
        namespace: namespace.to_owned(),
        created: object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        parents,
        rules,
    })
}

fn convert_match(spec: &MatchSpec, at: &str, key: &str) -> Result<RequestMatch, RouteError> {
    let error = |field: String, message: String| RouteError {
        route: key.to_owned(),
        field,
        message,
    };
    let path = match &spec.path {
        None => PathMatch::Prefix("/".into()),
        Some(path) => {
            if path.kind != "RegularExpression" && !path.value.starts_with('/') {
                return Err(error(
                    format!("{at}.path.value"),
                    format!("{:?} must start with /", path.value),
                ));
            }
            match path.kind.as_str() {
                "Exact" => PathMatch::Exact(path.value.clone()),
                "PathPrefix" => PathMatch::Prefix(path.value.clone()),
                "RegularExpression" => PathMatch::Regex(
                    anchored(&path.value).map_err(|m| error(format!("{at}.path.value"), m))?,
                ),
                other => {
                    return Err(error(
                        format!("{at}.path.type"),
                        format!("{other:?} (Exact, PathPrefix or RegularExpression)"),
                    ));
                }
            }
        }
    };
    let value_match = |spec: &ValueMatchSpec, field: String| match spec.kind.as_str() {
        "Exact" => Ok(ValueMatch::Exact(spec.value.clone())),
        "RegularExpression" => anchored(&spec.value)
            .map(ValueMatch::Regex)
            .map_err(|m| error(format!("{field}.value"), m)),
        other => Err(error(
            format!("{field}.type"),
            format!("{other:?} (Exact or RegularExpression)"),
        )),
    };
    let mut headers = Vec::new();
    for (h, header) in spec.headers.iter().enumerate() {
        let field = format!("{at}.headers[{h}]");
        let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
            error(
                format!("{field}.name"),
                format!("{:?} is not a header name", header.name),
            )
        })?;
        headers.push((name, value_match(header, field)?));
    }
    let mut query = Vec::new();
    for (q, param) in spec.query_params.iter().enumerate() {
        let field = format!("{at}.queryParams[{q}]");
        query.push((param.name.clone(), value_match(param, field)?));
    }
    let method = spec
        .method
        .as_deref()
        .map(|m| {
            Method::from_bytes(m.as_bytes())
                .map_err(|_| error(format!("{at}.method"), format!("{m:?} is not a method")))
        })
        .transpose()?;
    Ok(RequestMatch {
        path,
        headers,
        query,
        method,
    })
}

/// Gateway API regular expressions match the whole value.
fn anchored(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

fn convert_modifier(
    spec: &HeaderModifierSpec,
    at: &str,
    key: &str,
) -> Result<HeaderModifier, RouteError> {
    let error = |message: String| RouteError {
        route: key.to_owned(),
        field: at.to_owned(),
        message,
    };
    let pair = |h: &HeaderSpec| {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| error(format!("{:?} is not a header name", h.name)))?;
        let value = HeaderValue::from_str(&h.value)
            .map_err(|_| error(format!("{:?} is not a header value", h.value)))?;
        Ok::<_, RouteError>((name, value))
    };
    Ok(HeaderModifier {
        set: spec.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: spec.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: spec
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| error(format!("{n:?} is not a header name")))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn convert_path_modifier(
    spec: &PathModifierSpec,
    at: &str,
    key: &str,
) -> Result<PathModifier, RouteError> {
    let error = |message: String| RouteError {
        route: key.to_owned(),
        field: format!("{at}.path"),
        message,
    };
    match spec.kind.as_str() {
        "ReplaceFullPath" => spec
            .replace_full_path
            .clone()
            .map(PathModifier::ReplaceFullPath)
            .ok_or_else(|| error("ReplaceFullPath without replaceFullPath".into())),
        "ReplacePrefixMatch" => spec
            .replace_prefix_match
            .clone()
            .map(PathModifier::ReplacePrefixMatch)
            .ok_or_else(|| error("ReplacePrefixMatch without replacePrefixMatch".into())),
        other => Err(error(format!(
            "type {other:?} (ReplaceFullPath or ReplacePrefixMatch)"
        ))),
    }
}

#[cfg(test)]
mod tests;
