//! HTTPRoute and GRPCRoute conversion from arbitrary JSON specs (the same spec as both kinds),
//! then routing an arbitrary request through whatever converted: errors, never panics; a
//! rejected route keeps the previous version.
#![no_main]

use std::collections::BTreeMap;

use hyper::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use nodemesh::{
    k8s::objects::{GrpcRouteObject, HttpRouteObject},
    state::routes::{RequestView, RouteTable},
};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let (Some(spec), request) = (parts.next(), parts.next().unwrap_or_default()) else {
        return;
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(spec) else {
        return;
    };
    let object = serde_json::json!({
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": spec,
    });
    let http: HttpRouteObject = serde_json::from_value(object.clone()).expect("metadata");
    let grpc: GrpcRouteObject = serde_json::from_value(object).expect("metadata");
    let key = ("ns".to_owned(), "r".to_owned());
    let (table, errors) = RouteTable::build(
        &BTreeMap::from([(key.clone(), http)]),
        &BTreeMap::from([(key, grpc)]),
        &RouteTable::default(),
    );
    for error in &errors {
        let message = error.to_string();
        assert!(
            message.starts_with("HTTPRoute ns/r: spec") || message.starts_with("GRPCRoute ns/r: spec"),
            "{message}"
        );
    }
    let text = String::from_utf8_lossy(request);
    let (path, query) = text.split_once('?').unwrap_or((&text, ""));
    let headers = HeaderMap::new();
    let view = RequestView {
        method: &Method::GET,
        path,
        query: Some(query),
        headers: &headers,
    };
    let _ = table.decide("ns/web", 80, "ns", &view);
});
