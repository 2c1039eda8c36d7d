//! GRPCRoutes: method and header matches, precedence among them and with HTTPRoutes,
//! filters, errors with their field, status write-back under the GRPCRoute kind.

use std::collections::BTreeMap;

use hyper::{HeaderMap, Method, header::HeaderValue};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::k8s::objects::{GrpcRouteObject, HttpRouteObject};

const PARENT: &str = "parentRefs: [{group: '', kind: Service, name: grpc, port: 9000}]\n";

fn object<K>(name: &str, yaml: &str) -> ((String, String), crate::k8s::objects::RouteObject<K>) {
    let spec: serde_json::Value = serde_yaml::from_str(yaml).expect("test YAML");
    let metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("shop".into()),
        generation: Some(1),
        ..Default::default()
    };
    (
        ("shop".to_owned(), name.to_owned()),
        crate::k8s::objects::RouteObject::new(metadata, spec),
    )
}

fn grpc_table(
    http: &[((String, String), HttpRouteObject)],
    grpc: &[((String, String), GrpcRouteObject)],
) -> (RouteTable, Vec<RouteError>) {
    RouteTable::build(
        &http.iter().cloned().collect(),
        &grpc.iter().cloned().collect(),
        &RouteTable::default(),
    )
}

/// The route and first backend a gRPC call to `path` with `headers` goes to.
fn call(
    table: &RouteTable,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Option<(String, String)> {
    let grpc: &[(&'static str, &str)] = &[("content-type", "application/grpc")];
    request(table, path, &[grpc, headers].concat())
}

/// The route and first backend a request (POST `path` with `headers`) goes to.
fn request(
    table: &RouteTable,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Option<(String, String)> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, HeaderValue::from_str(value).expect("header"));
    }
    let view = RequestView {
        method: &Method::POST,
        path,
        query: None,
        headers: &map,
    };
    match table.decide("shop/grpc", 9000, "shop", &view) {
        RouteDecision::Matched { route, rule, .. } => {
            Some((route.to_owned(), rule.backends[0].service.clone()))
        }
        RouteDecision::NoMatch => None,
        RouteDecision::Unrouted => Some(("unrouted".into(), String::new())),
    }
}

#[test]
fn methods_services_expressions_and_headers_route_in_precedence_order() {
    let spec = format!(
        "{PARENT}rules:
  - matches: [{{method: {{service: shop.Cart}}}}]
    backendRefs: [{{name: cart, port: 9000}}]
  - matches: [{{method: {{service: shop.Cart, method: Checkout}}}}]
    backendRefs: [{{name: checkout, port: 9000}}]
  - matches: [{{method: {{method: Health}}}}]
    backendRefs: [{{name: health, port: 9000}}]
  - matches: [{{method: {{type: RegularExpression, service: 'shop\\.v[0-9]+\\.Search', method: 'Find.*'}}}}]
    backendRefs: [{{name: search, port: 9000}}]
  - matches: [{{method: {{service: shop.Cart}}, headers: [{{name: x-canary, value: 'yes'}}]}}]
    backendRefs: [{{name: cart-canary, port: 9000}}]
"
    );
    let (table, errors) = grpc_table(&[], &[object("calls", &spec)]);
    assert!(errors.is_empty(), "{errors:?}");
    let backend = |path: &str, headers: &[(&'static str, &str)]| {
        call(&table, path, headers).map(|(route, backend)| {
            assert_eq!(route, "GRPCRoute shop/calls");
            backend
        })
    };
    // An exact service and method first, then more header matches, then the service.
    assert_eq!(
        backend("/shop.Cart/Checkout", &[]).as_deref(),
        Some("shop/checkout")
    );
    assert_eq!(
        backend("/shop.Cart/Add", &[("x-canary", "yes")]).as_deref(),
        Some("shop/cart-canary")
    );
    assert_eq!(backend("/shop.Cart/Add", &[]).as_deref(), Some("shop/cart"));
    // A service prefix is element-wise: not another service that starts the same.
    assert_eq!(backend("/shop.CartAdmin/Add", &[]), None);
    // The method of any service; the expressions match whole names.
    assert_eq!(
        backend("/other.Svc/Health", &[]).as_deref(),
        Some("shop/health")
    );
    assert_eq!(
        backend("/shop.v2.Search/FindAll", &[]).as_deref(),
        Some("shop/search")
    );
    assert_eq!(backend("/shop.v2.Search/List", &[]), None);
    assert_eq!(backend("/xshop.v2.Search/FindAll", &[]), None);
}

#[test]
fn a_grpcroute_takes_grpc_calls_only_and_ranks_exact_names_before_expressions() {
    let spec = format!(
        "{PARENT}rules:
  - matches: [{{method: {{type: RegularExpression, method: 'H.*'}}}}]
    backendRefs: [{{name: regex, port: 9000}}]
  - matches: [{{method: {{method: Health}}}}]
    backendRefs: [{{name: exact-method, port: 9000}}]
  - matches: [{{method: {{service: .grpc.health.v1.Health, method: ''}}}}]
    backendRefs: [{{name: exact-service, port: 9000}}]
  - backendRefs: [{{name: every-call, port: 9000}}]
"
    );
    let (table, errors) = grpc_table(&[], &[object("calls", &spec)]);
    assert!(errors.is_empty(), "{errors:?}");
    let backend = |path: &str| call(&table, path, &[]).map(|(_, backend)| backend);
    // The exact service (its leading dot is not in the path) before the exact method,
    // before the expression, however long the expression is.
    assert_eq!(
        backend("/grpc.health.v1.Health/Check").as_deref(),
        Some("shop/exact-service")
    );
    assert_eq!(
        backend("/other.Svc/Health").as_deref(),
        Some("shop/exact-method")
    );
    assert_eq!(backend("/other.Svc/Hello").as_deref(), Some("shop/regex"));
    assert_eq!(
        backend("/other.Svc/Check").as_deref(),
        Some("shop/every-call")
    );
    // A rule without a method match takes every gRPC call, and no plain HTTP request.
    assert_eq!(
        request(
            &table,
            "/other.Svc/Check",
            &[("content-type", "application/json")]
        ),
        None
    );
    let proto = request(
        &table,
        "/x/y",
        &[("content-type", "application/grpc+proto")],
    );
    assert_eq!(proto.map(|(_, b)| b).as_deref(), Some("shop/every-call"));
}

#[test]
fn a_grpcroute_and_an_httproute_of_the_same_name_both_apply() {
    let http = "parentRefs: [{group: '', kind: Service, name: grpc, port: 9000}]
rules: [{matches: [{path: {type: PathPrefix, value: /web}}], backendRefs: [{name: web, port: 80}]}]
";
    let grpc = format!("{PARENT}rules: [{{backendRefs: [{{name: all, port: 9000}}]}}]\n");
    let (table, errors) = grpc_table(&[object("r", http)], &[object("r", &grpc)]);
    assert!(errors.is_empty(), "{errors:?}");
    // Plain HTTP takes the HTTPRoute; a gRPC call the GRPCRoute, ranked first, even on a
    // path the HTTPRoute matches.
    assert_eq!(
        request(&table, "/web/x", &[]),
        Some(("shop/r".into(), "shop/web".into()))
    );
    assert_eq!(
        call(&table, "/web/x", &[]),
        Some(("GRPCRoute shop/r".into(), "shop/all".into()))
    );
    assert_eq!(request(&table, "/any.Svc/Call", &[]), None);
    let kinds: Vec<&str> = table.views().iter().map(|v| v.kind).collect();
    assert_eq!(kinds, ["GRPCRoute", "HTTPRoute"]);
}

#[test]
fn what_cannot_be_honoured_is_refused_with_its_field() {
    let cases = [
        (
            "matches: [{method: {service: 'shop/Cart'}}]",
            "spec.rules[0].matches[0].method.service",
        ),
        (
            "matches: [{method: {type: Exact}}]",
            "spec.rules[0].matches[0].method",
        ),
        (
            "matches: [{method: {type: RegularExpression, method: '(('}}]",
            "spec.rules[0].matches[0].method.method",
        ),
        (
            "matches: [{method: {type: RegularExpression, service: 'a)|(b'}}]",
            "spec.rules[0].matches[0].method.service",
        ),
        (
            "matches: [{method: {type: RegularExpression, service: ''}}]",
            "spec.rules[0].matches[0].method",
        ),
        (
            "backendRefs: [{name: b, port: 9000, filters: [{type: RequestHeaderModifier}]}]",
            "spec.rules[0].backendRefs[0].filters",
        ),
        (
            "matches: [{method: {type: Prefix, service: a.B}}]",
            "spec.rules[0].matches[0].method.type",
        ),
        (
            "filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 1}}}]",
            "spec.rules[0].filters[0].type",
        ),
        (
            "matches: [{headers: [{name: 'bad name', value: x}]}]",
            "spec.rules[0].matches[0].headers[0].name",
        ),
    ];
    for (rule, field) in cases {
        let backends = if rule.contains("backendRefs") {
            String::new()
        } else {
            ", backendRefs: [{name: b, port: 9000}]".to_owned()
        };
        let spec = format!("{PARENT}rules: [{{{rule}{backends}}}]\n");
        let (_, errors) = grpc_table(&[], &[object("bad", &spec)]);
        assert_eq!(errors.len(), 1, "{rule}");
        assert_eq!(errors[0].field, field, "{rule}: {}", errors[0]);
        assert!(
            errors[0].to_string().starts_with("GRPCRoute shop/bad: "),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn header_modifiers_apply_and_status_is_reported_as_a_grpcroute() {
    let spec = format!(
        "{PARENT}rules:
  - filters:
      - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-route, value: grpc}}]}}}}
    backendRefs: [{{name: a, port: 9000, weight: 3}}, {{name: b, port: 9000, weight: 1}}]
"
    );
    let routes: BTreeMap<_, _> = [object::<crate::k8s::objects::Grpc>("calls", &spec)]
        .into_iter()
        .collect();
    let (table, errors) = RouteTable::build(&BTreeMap::new(), &routes, &RouteTable::default());
    assert!(errors.is_empty(), "{errors:?}");
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    let view = RequestView {
        method: &Method::POST,
        path: "/a.B/C",
        query: None,
        headers: &headers.clone(),
    };
    let RouteDecision::Matched { rule, .. } = table.decide("shop/grpc", 9000, "shop", &view) else {
        panic!("no match");
    };
    rule.request_headers
        .as_ref()
        .expect("modifier")
        .apply(&mut headers);
    assert_eq!(headers["x-route"], "grpc");
    let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [3, 1]);

    let updates = status_updates(&routes, &errors, |_| true, "2026-12-04T00:00:00Z");
    assert_eq!(updates.len(), 1);
    assert_eq!(
        (updates[0].kind, updates[0].name.as_str()),
        ("GRPCRoute", "calls")
    );
    let accepted = &updates[0].parents[0]["conditions"][0];
    assert_eq!(accepted["status"], "True");
}
