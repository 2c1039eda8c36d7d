use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

fn policy(
    namespace: &str,
    name: &str,
    yaml: &str,
) -> ((String, String), AuthorizationPolicyObject) {
    (
        (namespace.to_owned(), name.to_owned()),
        AuthorizationPolicyObject {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: serde_yaml::from_str(yaml).expect("test YAML"),
        },
    )
}

fn pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> LocalPod {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace,
                     "labels": labels.iter().copied().collect::<BTreeMap<_, _>>()},
    }))
    .expect("a pod");
    crate::k8s::compact::local_pod(&pod).expect("named")
}

fn id(namespace: &str, account: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", namespace, account).unwrap()
}

fn index(
    policies: &[((String, String), AuthorizationPolicyObject)],
    pods: &[LocalPod],
) -> AuthorizationIndex {
    let (index, errors) = AuthorizationIndex::build(
        &policies.iter().cloned().collect(),
        pods.iter(),
        &AuthorizationIndex::default(),
    );
    assert!(errors.is_empty(), "{errors:?}");
    index
}

fn decision(
    index: &AuthorizationIndex,
    pod: &str,
    source: Option<&SpiffeId>,
    port: u16,
    http: Option<(&str, &str)>,
) -> Decision {
    decide(
        &index.for_pod(pod),
        &RequestAttributes { source, port, http },
    )
}

#[test]
fn no_policy_allows_and_an_allow_policy_restricts_its_workloads() {
    let web = pod("shop", "web", &[("app", "web")]);
    let db = pod("shop", "db", &[("app", "db")]);
    let index = index(
        &[policy(
            "shop",
            "web-from-frontend",
            "selector: {matchLabels: {app: web}}
rules:
  - from: [{serviceAccounts: [frontend]}]
",
        )],
        &[web, db],
    );
    let frontend = id("shop", "frontend");
    let other = id("shop", "other");
    assert_eq!(
        decision(&index, "shop/db", Some(&other), 5432, None),
        Decision::Allow
    );
    assert_eq!(
        decision(&index, "shop/web", Some(&frontend), 80, None),
        Decision::Allow
    );
    assert!(matches!(
        decision(&index, "shop/web", Some(&other), 80, None),
        Decision::Deny(_)
    ));
    assert!(
        matches!(
            decision(&index, "shop/web", None, 80, None),
            Decision::Deny(_)
        ),
        "plaintext has no identity"
    );
}

#[test]
fn deny_wins_and_http_attributes_fail_closed() {
    let web = pod("shop", "web", &[]);
    let index = index(
        &[
            policy(
                "shop",
                "allow-all-mesh",
                "rules: [{from: [{namespaces: ['*']}]}]\n",
            ),
            policy(
                "shop",
                "no-admin",
                "action: DENY
rules:
  - to: [{paths: ['/admin*'], methods: [POST]}]
",
            ),
        ],
        &[web],
    );
    let client = id("other", "client");
    assert_eq!(
        decision(
            &index,
            "shop/web",
            Some(&client),
            80,
            Some(("GET", "/admin/x"))
        ),
        Decision::Allow
    );
    assert_eq!(
        decision(
            &index,
            "shop/web",
            Some(&client),
            80,
            Some(("POST", "/admin/x"))
        ),
        Decision::Deny("shop/no-admin".into())
    );
    assert_eq!(
        decision(&index, "shop/web", Some(&client), 80, None),
        Decision::Deny("shop/no-admin".into()),
        "a DENY on HTTP attributes applies to traffic whose HTTP request is unknown"
    );
    assert!(
        index
            .for_pod("shop/web")
            .iter()
            .any(|p| p.inspects_http(80))
    );
}

#[test]
fn allow_rules_on_ports_principals_and_paths() {
    let web = pod("shop", "web", &[("app", "web")]);
    let index = index(
        &[policy(
            "shop",
            "web",
            "selector: {matchLabels: {app: web}}
rules:
  - from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}]
    to: [{ports: [8080], methods: [GET], paths: ['/public/*', /health]}]
  - to: [{ports: [9090]}]
",
        )],
        &[web],
    );
    let frontend = id("shop", "frontend");
    let allowed = |source: Option<&SpiffeId>, port, http| {
        decision(&index, "shop/web", source, port, http) == Decision::Allow
    };
    assert!(allowed(Some(&frontend), 8080, Some(("GET", "/public/a"))));
    assert!(allowed(Some(&frontend), 8080, Some(("GET", "/health"))));
    assert!(!allowed(Some(&frontend), 8080, Some(("GET", "/healthz"))));
    assert!(!allowed(
        Some(&frontend),
        8080,
        Some(("DELETE", "/public/a"))
    ));
    assert!(!allowed(
        Some(&id("shop", "x")),
        8080,
        Some(("GET", "/public/a"))
    ));
    assert!(
        !allowed(Some(&frontend), 8080, None),
        "an ALLOW on HTTP attributes needs HTTP"
    );
    assert!(
        allowed(None, 9090, None),
        "port 9090 is open to anyone, plaintext included"
    );
}

#[test]
fn invalid_policies_name_the_field_and_keep_the_last_good_version() {
    let web = pod("shop", "web", &[]);
    let good = policy(
        "shop",
        "p",
        "action: DENY\nrules: [{to: [{ports: [22]}]}]\n",
    );
    let first = index(&[good], std::slice::from_ref(&web));
    for (yaml, field) in [
        ("action: MAYBE\n", "spec.action"),
        (
            "rules: [{from: [{principals: [frontend]}]}]\n",
            "spec.rules[0].from[0].principals[0]",
        ),
        (
            "rules: [{to: [{paths: [admin]}]}]\n",
            "spec.rules[0].to[0].paths[0]",
        ),
        (
            "rules: [{to: [{ports: [http]}]}]\n",
            "spec.rules[0].to[0].ports[0]",
        ),
        ("rulez: []\n", "spec.rulez"),
    ] {
        let (second, errors) = AuthorizationIndex::build(
            &[policy("shop", "p", yaml)].into_iter().collect(),
            std::iter::once(&web),
            &first,
        );
        assert_eq!(errors.len(), 1, "{yaml}");
        assert_eq!(errors[0].field, field, "{}", errors[0]);
        assert_eq!(
            decision(&second, "shop/web", None, 22, None),
            Decision::Deny("shop/p".into()),
            "the last good version still applies"
        );
    }
}
