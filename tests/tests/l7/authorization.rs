//! AuthorizationPolicy at L7: allowed and denied by identity, port, method and path.

use super::*;

/// The local pods `policy` selects on `node`, once the agent has loaded it.
pub(super) fn wait_for_policy(tb: &Testbed, node: &str, policy: &str, pod: &str) {
    wait_until(Duration::from_secs(10), "policy loaded", || {
        let dump = tb.admin_json(node, "/config_dump")?;
        Ok(dump["authorization_policies"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["policy"] == policy
                    && p["selects"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|x| x == pod))
            }))
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn authorization_allows_and_denies_by_identity_port_method_and_path() {
    let (tb, _ca) = setup("nml7a");
    let client_a = client(&tb);
    let client_b = tb.pod("mesh", "client-b").clone();
    let outsider = tb.pod("plain", "outsider").clone();
    let server_a = tb.pod("mesh", "server-a").clone();
    let server_b = tb.pod("mesh", "server-b").clone();
    apply_example(&tb, "policy-allow");
    apply_example(&tb, "policy-deny");
    apply_example(&tb, "policy-l4");
    wait_for_policy(&tb, "node2", "mesh/server-b-readers", "mesh/server-b");
    wait_for_policy(&tb, "node2", "mesh/server-b-no-admin", "mesh/server-b");
    wait_for_policy(&tb, "node1", "mesh/server-a-from-client-b", "mesh/server-a");

    // L7 at server-b, through the Service (the client's node parses HTTP too) and to the
    // pod's address (the client's node relays bytes; server-b's node parses them).
    for target in [WEB_B.to_owned(), format!("{}:{APP_PORT}", server_b.ipv4())] {
        let (code, body) = curl(&tb, &client_a, &[&format!("http://{target}/echo/ok")]);
        assert_eq!(code, 200, "{target}: {body}");
        let (code, body) = curl(&tb, &client_a, &[&format!("http://{target}/admin/users")]);
        assert_eq!(code, 403, "DENY wins: {target}: {body}");
        assert!(
            body.contains("GET /admin/users denied to spiffe://cluster.local/ns/mesh/sa/client-a by authorization policy"),
            "{body}"
        );
        let (code, _) = curl(
            &tb,
            &client_a,
            &["-X", "POST", &format!("http://{target}/echo/x")],
        );
        assert_eq!(code, 403, "only GET is allowed: {target}");
        let (code, _) = curl(&tb, &client_b, &[&format!("http://{target}/echo/ok")]);
        assert_eq!(code, 403, "client-b is not an allowed principal: {target}");
    }
    // The connection survives a denied request: the next one reuses it and succeeds.
    let mut both = Command::new("curl");
    both.args([
        "-s",
        "-o",
        "/dev/null",
        &format!("http://{WEB_B}/admin"),
        "--next",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{num_connects}",
        &format!("http://{WEB_B}/echo/after"),
    ]);
    let result = stdout(&tb.run_in_pod(&client_a, both).expect("curl"));
    assert_eq!(result, "200 0", "second request on the same connection");

    // L4 at server-a: client-b's connections are accepted, client-a's refused at CONNECT
    // (its node's L7 proxy answers 403; a raw connection is reset).
    let (code, _) = curl(&tb, &client_b, &[&format!("http://{WEB_A}/echo/ok")]);
    assert_eq!(code, 200);
    let (code, body) = curl(&tb, &client_a, &[&format!("http://{WEB_A}/echo/ok")]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("denied by its authorization policy"),
        "{body}"
    );
    let (code, _) = curl(
        &tb,
        &client_a,
        &[&format!("http://{}:{APP_PORT}/echo/ok", server_a.ipv4())],
    );
    assert_eq!(code, 0, "no HTTP response on a refused connection");
    // Plaintext from outside the mesh has no identity: an ALLOW policy refuses it.
    let (code, _) = curl(
        &tb,
        &outsider,
        &[&format!("http://{}:{APP_PORT}/echo/ok", server_a.ipv4())],
    );
    assert_eq!(code, 0, "plaintext refused");

    // What the CRD's schema forbids, the API server refuses, naming the field.
    let mut refused = example("policy-deny");
    refused["spec"]["action"] = "REJECT".into();
    let error = tb
        .apply_object("example-policy-deny.yaml", &refused)
        .expect_err("the API server validates the CRD's schema");
    assert!(
        error
            .to_string()
            .contains(r#"spec.action: Unsupported value: \"REJECT\""#),
        "{error}"
    );
    // What passes the schema but not the agent's checks is reported, and the last good
    // version keeps applying.
    let mut broken = example("policy-deny");
    broken["spec"]["rules"][0]["to"][0]["paths"][0] = "admin*".into();
    tb.apply_object("example-policy-deny.yaml", &broken)
        .expect("policy");
    wait_until(Duration::from_secs(10), "policy error reported", || {
        let dump = tb.admin_json("node2", "/config_dump")?;
        Ok(dump["config_errors"].as_array().is_some_and(|errors| {
            errors.iter().any(|e| {
                e.as_str().is_some_and(|e| {
                    e.starts_with(
                        "AuthorizationPolicy mesh/server-b-no-admin: spec.rules[0].to[0].paths[0]: \"admin*\" must start with /",
                    )
                })
            })
        }))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (code, _) = curl(&tb, &client_a, &[&format!("http://{WEB_B}/admin/users")]);
    assert_eq!(code, 403);
}
