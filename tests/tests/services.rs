//! Service resolution on the testbed: a meshed pod dials a Service's ClusterIP (there is no
//! kube-proxy here, so nothing else could answer it), the connect hook captures it before
//! any translation, and the node proxy picks a ready endpoint from the EndpointSlice and
//! carries the connection there over HBONE. The Service port is declared `appProtocol: tcp`,
//! so connections are relayed at L4 (tests/l7/ covers HTTP per request). Needs root.

use std::process::Command;

use nodemesh_testbed::{MeshCa, Testbed, cluster_state, is_root, wait_until};
use serde_json::Value;

const CLUSTER_IP: &str = "198.18.200.10";
const SERVICE_PORT: u16 = 80;
const APP_PORT: u16 = 8080;

fn meshed_testbed() -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let (tb, ca) = Testbed::create_meshed("nmsv", 3600).expect("meshed testbed");
    for name in ["server-a", "server-b"] {
        let server = tb.pod("mesh", name).clone();
        tb.start_http_server(&server, APP_PORT)
            .expect("http server");
    }
    (tb, ca)
}

/// Writes the Service and its EndpointSlice (server-a on node1, server-b on node2).
fn apply_service(tb: &Testbed, server_b_terminating: bool) {
    let mut service =
        cluster_state::service_object("mesh", "web", CLUSTER_IP, SERVICE_PORT, "http");
    // appProtocol tcp: this file tests L4 Service resolution (an endpoint per connection,
    // round-robin); per-request HTTP balancing is in tests/l7/.
    if let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        ports[0].app_protocol = Some("tcp".into());
    }
    tb.apply_object("service-mesh-web.yaml", &service)
        .expect("service");
    let a = tb.pod("mesh", "server-a").clone();
    let b = tb.pod("mesh", "server-b").clone();
    let slice = cluster_state::endpoint_slice_object(
        "web",
        "http",
        APP_PORT,
        &[(&a, false), (&b, server_b_terminating)],
    );
    tb.apply_object("endpointslice-mesh-web.yaml", &slice)
        .expect("endpoint slice");
}

/// HBONE connections each node's server delivered to `pod_ip:8080`.
fn delivered(tb: &Testbed, node: &str, pod_ip: &str) -> u64 {
    let stats = tb.admin_json(node, "/stats").expect("stats");
    stats["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["destination"] == format!("{pod_ip}:{APP_PORT}"))
        .filter(|s| {
            s["source_pod"]
                .as_str()
                .is_some_and(|p| p.starts_with("spiffe://"))
        })
        .map(|s| s["opened"].as_u64().unwrap_or(0))
        .sum()
}

/// Runs `count` curls to the Service from `client` and returns how many got 200.
fn curl_service(tb: &Testbed, client: &str, namespace: &str, count: usize) -> usize {
    let pod = tb.pod(namespace, client).clone();
    let url = format!("http://{CLUSTER_IP}:{SERVICE_PORT}/");
    let script = format!(
        "for i in $(seq {count}); do curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 5 {url}; done"
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", &script]);
    let output = tb.run_in_pod(&pod, sh).expect("curl loop");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|code| *code == "200")
        .count()
}

/// Waits until the node's service index holds `entries` virtual addresses.
fn wait_services(tb: &Testbed, node: &str, entries: usize) {
    wait_until(
        std::time::Duration::from_secs(5),
        "service index loaded",
        || {
            let dump: Value = tb.admin_json(node, "/config_dump")?;
            Ok(Testbed::workload_services(&dump).len() == entries)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_cluster_ip_reaches_ready_endpoints_on_both_nodes_through_the_mesh() {
    let (tb, _ca) = meshed_testbed();
    apply_service(&tb, false);
    wait_services(&tb, "node1", 1);
    let (a_ip, b_ip) = (
        tb.pod("mesh", "server-a").ipv4().to_string(),
        tb.pod("mesh", "server-b").ipv4().to_string(),
    );

    assert_eq!(curl_service(&tb, "client-a", "mesh", 10), 10);
    let (on_a, on_b) = (
        delivered(&tb, "node1", &a_ip),
        delivered(&tb, "node2", &b_ip),
    );
    assert_eq!(
        on_a + on_b,
        10,
        "every request reached one endpoint over HBONE"
    );
    assert_eq!((on_a, on_b), (5, 5), "round-robin across the two nodes");

    // Without the mesh nothing answers the ClusterIP (no kube-proxy in the testbed).
    assert_eq!(curl_service(&tb, "outsider", "plain", 1), 0);

    // server-b terminating: new connections go to server-a only.
    apply_service(&tb, true);
    wait_until(std::time::Duration::from_secs(5), "endpoint update", || {
        let dump: Value = tb.admin_json("node1", "/config_dump")?;
        let web = Testbed::workload_services(&dump);
        Ok(web.len() == 1 && web[0]["ready_endpoints"].as_array().map(Vec::len) == Some(1))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(curl_service(&tb, "client-a", "mesh", 6), 6);
    assert_eq!(delivered(&tb, "node1", &a_ip), on_a + 6);
    assert_eq!(delivered(&tb, "node2", &b_ip), on_b);
}
