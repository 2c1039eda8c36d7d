//! The L7 proxy's requests to an endpoint on the client's own node: handed to the
//! destination pod's admission in process (over a socket pair), not sent over HBONE from
//! the agent to itself, and decided by the destination's policies as over HBONE.

use std::net::SocketAddr;

use nodemesh_testbed::{HBONE_PORT, established_connections, hbone_connections};

use super::*;

/// HBONE connections established in `pod`'s network namespace.
fn hbone_sockets(pod: &Pod) -> usize {
    hbone_connections(pod.netns()).expect("ss").len()
}

#[test]
fn requests_to_an_endpoint_of_the_same_node_skip_hbone_and_are_decided_by_the_destination() {
    let (tb, _ca) = setup("nml7s");
    let client_a = client(&tb);
    let server_a = tb.pod("mesh", "server-a").clone();
    let server_b = tb.pod("mesh", "server-b").clone();
    assert_eq!(
        (client_a.node(), server_a.node(), server_b.node()),
        ("node1", "node1", "node2")
    );

    // The control: to web-b's endpoint on the other node, the pooled connection is an HBONE
    // tunnel, whose end server-b's pod holds while the pool keeps the connection.
    let (code, body) = curl(&tb, &client_a, &[&format!("http://{WEB_B}/echo/across")]);
    assert_eq!(code, 200, "{body}");
    assert!(
        hbone_sockets(&server_b) >= 1,
        "an HBONE tunnel in server-b's pod"
    );

    // Same node, HTTP/1.1 and HTTP/2: answered, with no HBONE socket on the way, and the
    // application sees client-a's address on the pooled connection.
    let (code, body) = curl(&tb, &client_a, &[&format!("http://{WEB_A}/echo/here")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["path"], "/echo/here", "{body}");
    let (code, body) = curl(
        &tb,
        &client_a,
        &[
            "--http2-prior-knowledge",
            &format!("http://{WEB_A}/echo/h2"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "{body}");
    let in_server = established_connections(server_a.netns()).expect("ss");
    assert!(
        in_server
            .iter()
            .any(|(local, peer)| local.port() == APP_PORT
                && peer.ip().to_canonical() == client_a.ipv4()),
        "the application sees client-a's address: {in_server:?}"
    );
    assert_eq!(hbone_sockets(&server_a), 0, "{in_server:?}");
    let in_client = established_connections(client_a.netns()).expect("ss");
    let to_a = SocketAddr::from((server_a.ipv4(), HBONE_PORT));
    assert!(
        !in_client.iter().any(|(_, peer)| *peer == to_a),
        "nor one from client-a to server-a: {in_client:?}"
    );
    // Admitted by server-a's side under client-a's identity.
    let stats = tb.admin_json("node1", "/stats").expect("stats");
    let admitted = (stats["connections"].as_array().into_iter().flatten()).any(|s| {
        s["source_pod"] == "spiffe://cluster.local/ns/mesh/sa/client-a"
            && s["destination"] == format!("{}:{APP_PORT}", server_a.ipv4())
    });
    assert!(admitted, "{stats}");

    // The attack: server-a's DENY of /admin* holds for requests the client's own node
    // forwards, on their normalised path, and the pooled connection carries on after a
    // denied request.
    let mut no_admin = example("policy-deny");
    no_admin["metadata"]["name"] = "server-a-no-admin".into();
    no_admin["spec"]["selector"]["matchLabels"]["app"] = "server-a".into();
    tb.apply_object("server-a-no-admin.yaml", &no_admin)
        .expect("policy");
    authorization::wait_for_policy(&tb, "node1", "mesh/server-a-no-admin", "mesh/server-a");
    for path in ["/admin/users", "/echo/%2e%2e/admin/users"] {
        let (code, body) = curl(&tb, &client_a, &[&format!("http://{WEB_A}{path}")]);
        assert_eq!(code, 403, "{path}: {body}");
        assert!(
            body.contains(
                "denied to spiffe://cluster.local/ns/mesh/sa/client-a by authorization policy"
            ),
            "{path}: {body}"
        );
    }
    let (code, body) = curl(&tb, &client_a, &[&format!("http://{WEB_A}/echo/after")]);
    assert_eq!(
        (code, json(&body)["path"].clone()),
        (200, "/echo/after".into())
    );
    assert_eq!(hbone_sockets(&server_a), 0, "still no HBONE on the way");

    // A DENY of client-a itself: its requests on the pooled connection, and any new
    // connection the pool would make, are refused, over HTTP/1.1 and HTTP/2.
    let mut deny_a = example("policy-deny");
    deny_a["metadata"]["name"] = "server-a-not-client-a".into();
    deny_a["spec"]["selector"]["matchLabels"]["app"] = "server-a".into();
    deny_a["spec"]["rules"] = serde_yaml::from_str(
        "[{from: [{principals: ['spiffe://cluster.local/ns/mesh/sa/client-a']}]}]",
    )
    .expect("rules");
    tb.apply_object("server-a-not-client-a.yaml", &deny_a)
        .expect("policy");
    authorization::wait_for_policy(&tb, "node1", "mesh/server-a-not-client-a", "mesh/server-a");
    let url = format!("http://{WEB_A}/echo/denied");
    for args in [
        vec![url.as_str()],
        vec!["--http2-prior-knowledge", url.as_str()],
    ] {
        let (code, body) = curl(&tb, &client_a, &args);
        assert_eq!(code, 403, "{args:?}: {body}");
        assert!(body.contains("denied"), "{args:?}: {body}");
    }
}
