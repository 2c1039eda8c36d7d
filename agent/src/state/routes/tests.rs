use std::{collections::BTreeMap, time::Duration};

use hyper::{Method, header::HeaderValue};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::k8s::objects::HttpRouteObject;

fn route(namespace: &str, name: &str, yaml: &str) -> ((String, String), HttpRouteObject) {
    let spec: serde_json::Value = serde_yaml::from_str(yaml).expect("test YAML");
    (
        (namespace.to_owned(), name.to_owned()),
        HttpRouteObject::new(
            ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec,
        ),
    )
}

fn table(routes: &[((String, String), HttpRouteObject)]) -> (RouteTable, Vec<RouteError>) {
    RouteTable::build(
        &routes.iter().cloned().collect(),
        &BTreeMap::new(),
        &RouteTable::default(),
    )
}

fn decide<'a>(
    table: &'a RouteTable,
    client_ns: &str,
    method: &Method,
    path_and_query: &'a str,
    headers: &'a hyper::HeaderMap,
) -> Option<(&'a str, Vec<String>)> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let view = RequestView {
        method,
        path,
        query,
        headers,
    };
    match table.decide("shop/web", 80, client_ns, &view) {
        RouteDecision::Matched { route, rule, .. } => Some((
            route,
            rule.backends.iter().map(|b| b.service.clone()).collect(),
        )),
        RouteDecision::NoMatch => None,
        RouteDecision::Unrouted => Some(("unrouted", vec![])),
    }
}

const PARENT: &str = "parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n";

#[test]
fn precedence_follows_the_gateway_api_order() {
    let spec = format!(
        "{PARENT}rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: root, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    backendRefs: [{{name: api, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /api/health}}}}]
    backendRefs: [{{name: health, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x-canary, value: 'yes'}}]}}]
    backendRefs: [{{name: canary, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /api}}, method: POST}}]
    backendRefs: [{{name: writes, port: 80}}]
"
    );
    let (table, errors) = table(&[route("shop", "web", &spec)]);
    assert!(errors.is_empty(), "{errors:?}");
    let none = hyper::HeaderMap::new();
    let mut canary = hyper::HeaderMap::new();
    canary.insert("x-canary", HeaderValue::from_static("yes"));
    let backend = |method: Method, path: &str, headers: &hyper::HeaderMap| {
        decide(&table, "shop", &method, path, headers)
            .map(|(_, b)| b.join(","))
            .unwrap_or_default()
    };
    assert_eq!(backend(Method::GET, "/", &none), "shop/root");
    assert_eq!(
        backend(Method::GET, "/apix", &none),
        "shop/root",
        "prefix is per path element"
    );
    assert_eq!(backend(Method::GET, "/api/v1", &none), "shop/api");
    assert_eq!(
        backend(Method::GET, "/api/health", &canary),
        "shop/health",
        "exact first"
    );
    assert_eq!(
        backend(Method::POST, "/api/v1", &canary),
        "shop/writes",
        "method before headers"
    );
    assert_eq!(backend(Method::GET, "/api/v1", &canary), "shop/canary");
}

#[test]
fn query_regex_and_no_match() {
    let spec = format!(
        "{PARENT}rules:
  - matches:
      - path: {{type: RegularExpression, value: '/items/[0-9]+'}}
        queryParams: [{{name: view, value: full}}]
    backendRefs: [{{name: items, port: 80}}]
"
    );
    let (table, errors) = table(&[route("shop", "web", &spec)]);
    assert!(errors.is_empty(), "{errors:?}");
    let none = hyper::HeaderMap::new();
    assert!(decide(&table, "shop", &Method::GET, "/items/42?view=full", &none).is_some());
    assert!(
        decide(&table, "shop", &Method::GET, "/items/42x?view=full", &none).is_none(),
        "regexes match the whole path"
    );
    assert!(decide(&table, "shop", &Method::GET, "/items/42?view=short", &none).is_none());
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let producer = format!("{PARENT}rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]\n");
    let consumer = "parentRefs: [{kind: Service, name: web, namespace: shop}]
rules: [{backendRefs: [{name: mine, port: 80}]}]
";
    let (table, errors) = table(&[
        route("shop", "web", &producer),
        route("client", "override", consumer),
    ]);
    assert!(errors.is_empty(), "{errors:?}");
    let none = hyper::HeaderMap::new();
    let route_for = |ns| decide(&table, ns, &Method::GET, "/", &none).map(|(r, _)| r.to_owned());
    assert_eq!(route_for("shop").as_deref(), Some("shop/web"));
    assert_eq!(route_for("other").as_deref(), Some("shop/web"));
    assert_eq!(route_for("client").as_deref(), Some("client/override"));
}

#[test]
fn an_invalid_route_is_reported_with_its_field_and_the_last_good_version_serves() {
    let good = format!("{PARENT}rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]\n");
    let (first, errors) = table(&[route("shop", "web", &good)]);
    assert!(errors.is_empty());

    let bad_regex = format!(
        "{PARENT}rules: [{{matches: [{{path: {{type: RegularExpression, value: '(('}}}}], backendRefs: [{{name: v2, port: 80}}]}}]\n"
    );
    let routes: BTreeMap<_, _> = [route("shop", "web", &bad_regex)].into_iter().collect();
    let (second, errors) = RouteTable::build(&routes, &BTreeMap::new(), &first);
    assert_eq!(errors.len(), 1);
    let message = errors[0].to_string();
    assert!(
        message.starts_with(
            "HTTPRoute shop/web: spec.rules[0].matches[0].path.value: invalid regular expression"
        ),
        "{message}"
    );
    let none = hyper::HeaderMap::new();
    assert_eq!(
        decide(&second, "shop", &Method::GET, "/", &none).map(|(_, b)| b),
        Some(vec!["shop/v1".to_owned()]),
        "the last good version keeps serving"
    );

    for (yaml, field) in [
        (
            format!(
                "{PARENT}rules: [{{backendRefs: [{{name: v1, namespace: other, port: 80}}]}}]\n"
            ),
            "spec.rules[0].backendRefs[0].namespace",
        ),
        (
            format!("{PARENT}rules: [{{backendRefs: [{{name: v1}}]}}]\n"),
            "spec.rules[0].backendRefs[0].port",
        ),
        (
            format!("{PARENT}rules: [{{timeouts: {{request: 10 seconds}}}}]\n"),
            "spec.rules[0].timeouts.request",
        ),
        (
            format!("{PARENT}rules: [{{filters: [{{type: Mirror}}]}}]\n"),
            "spec.rules[0].filters[0].type",
        ),
        (
            format!("{PARENT}rules: [{{matches: 7}}]\n"),
            "spec.rules[0].matches",
        ),
    ] {
        let (_, errors) = table(&[route("shop", "web", &yaml)]);
        assert_eq!(errors.len(), 1, "{yaml}");
        assert_eq!(errors[0].field, field, "{}", errors[0]);
    }
}

#[test]
fn weights_split_by_draw() {
    let rule = Rule {
        backends: vec![
            Backend {
                service: "a".into(),
                port: 80,
                weight: 90,
            },
            Backend {
                service: "b".into(),
                port: 80,
                weight: 10,
            },
        ],
        ..Default::default()
    };
    let b_count = (0..1000)
        .filter(|draw| rule.backend(*draw).unwrap().service == "b")
        .count();
    assert_eq!(b_count, 100);
    assert!(
        Rule::default().backend(3).is_none(),
        "no weight, no backend"
    );
}

#[test]
fn durations_and_rewrites() {
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert!(parse_duration("1.5s").is_err());
    assert!(parse_duration("").is_err());
    assert!(parse_duration("1h1m1s1ms1s").is_err());

    let matcher = RequestMatch {
        path: PathMatch::Prefix("/old".into()),
        headers: vec![],
        query: vec![],
        method: None,
        grpc: None,
    };
    let replace = |to: &str, path: &str| {
        matcher.rewrite_path(&PathModifier::ReplacePrefixMatch(to.into()), path)
    };
    assert_eq!(replace("/new", "/old/x"), "/new/x");
    assert_eq!(replace("/", "/old/x"), "/x");
    assert_eq!(replace("/", "/old"), "/");
    assert_eq!(replace("/new/", "/old"), "/new");
}

#[test]
fn status_reports_acceptance_and_missing_backends_and_is_written_only_when_it_changes() {
    let good = format!(
        "{PARENT}rules: [{{backendRefs: [{{name: v1, port: 80}}, {{name: gone, port: 80}}]}}]\n"
    );
    let routes: BTreeMap<_, _> = [route("shop", "web", &good)].into_iter().collect();
    let exists = |service: &str| service == "shop/v1";
    let updates = status_updates(&routes, &[], exists, "2026-11-29T00:00:00Z");
    assert_eq!(updates.len(), 1);
    let ours = &updates[0].parents[0];
    assert_eq!(ours["controllerName"], CONTROLLER_NAME);
    assert_eq!(ours["parentRef"]["name"], "web");
    assert_eq!(ours["conditions"][0]["type"], "Accepted");
    assert_eq!(ours["conditions"][0]["status"], "True");
    assert_eq!(ours["conditions"][1]["reason"], "BackendNotFound");
    assert_eq!(
        ours["conditions"][1]["message"],
        "no such Service: shop/gone"
    );

    // Once the route carries that status (at any time), there is nothing to write; another
    // controller's entry is kept.
    let mut written = routes.clone();
    let other =
        serde_json::json!({"controllerName": "example.com/other", "parentRef": {"name": "x"}});
    written.values_mut().next().unwrap().status =
        Some(serde_json::json!({"parents": [other.clone(), updates[0].parents[0].clone()]}));
    assert!(status_updates(&written, &[], exists, "2026-11-30T00:00:00Z").is_empty());

    // A conversion error flips Accepted and keeps the other controller's entry.
    let error = RouteError {
        route: RouteKey {
            kind: "HTTPRoute",
            name: "shop/web".into(),
        },
        field: "spec.rules[0].timeouts.request".into(),
        message: "bad".into(),
    };
    let updates = status_updates(&written, &[error], exists, "2026-11-30T00:00:00Z");
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].parents[0], other);
    let accepted = &updates[0].parents[1]["conditions"][0];
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("False"), Some("UnsupportedValue"))
    );
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.rules[0].timeouts.request: bad")
    );
}
