//! AuthorizationPolicy conversion from arbitrary JSON specs and decisions on it: errors name
//! the policy and a field, and a policy that does not convert never allows more than before.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use nodemesh::k8s::compact::local_pod;
use nodemesh::{
    identity::spiffe::SpiffeId,
    k8s::objects::AuthorizationPolicyObject,
    state::authorization::{AuthorizationIndex, Decision, RequestAttributes, decide},
};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let object: AuthorizationPolicyObject = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": spec,
    }))
    .expect("metadata");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "ns", "labels": {"app": "web"}},
    }))
    .expect("pod");
    let pod = local_pod(&pod).expect("named");
    let policies = BTreeMap::from([(("ns".to_owned(), "p".to_owned()), object)]);
    let (index, errors) = AuthorizationIndex::build(
        &policies,
        std::iter::once(&pod),
        &AuthorizationIndex::default(),
    );
    for error in &errors {
        assert!(
            error
                .to_string()
                .starts_with("AuthorizationPolicy ns/p: spec")
        );
    }
    let peer: SpiffeId = "spiffe://cluster.local/ns/ns/sa/client"
        .parse()
        .expect("id");
    let applied = index.for_pod("ns/web");
    if !errors.is_empty() {
        // Rejected with no earlier version: nothing applies, the mesh default (allow) holds.
        assert!(applied.is_empty());
    }
    for (source, http) in [
        (Some(&peer), Some(("GET", "/admin"))),
        (Some(&peer), None),
        (None, None),
    ] {
        let decision = decide(
            &applied,
            &RequestAttributes {
                source,
                port: 8080,
                http,
            },
        );
        if applied.is_empty() {
            assert_eq!(decision, Decision::Allow);
        }
    }
});
