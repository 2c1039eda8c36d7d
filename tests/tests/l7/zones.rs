//! Zone-aware balancing of requests on the testbed: node1 in zone-a, node2 in zone-b, a
//! Service with one endpoint in each, the one in the client's zone slower. Requests stay in
//! the zone at light load (where latency alone would send most away), spill the excess when
//! the zone is overloaded and come back, and fail over when the zone has no ready endpoint;
//! the spills are counted by reason. With regions, traffic that must leave the zone stays
//! in the region while the region keeps up. A local endpoint killed outright (still listed
//! as ready) costs no request an error under a retry policy: the retry avoids the endpoint
//! that failed. (Connections relayed as TCP: `zones_connections.rs`.)

use nodemesh_testbed::PodProcess;
use serde_json::json;

use super::*;

const ZONED: &str = "198.18.200.40";
const ZONED_PORT: u16 = 9090;
/// A Service whose endpoints are in other zones than the client's, one in its region.
const REGIONAL: &str = "198.18.200.43";

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Labels node1 into zone-a and node2 into zone-b through the API server.
pub(super) fn label_zones(tb: &Testbed) {
    let api = tb.api().expect("a real API server");
    api.label_nodes(ZONE_LABEL, &[("node1", "zone-a"), ("node2", "zone-b")])
        .expect("kubectl label node");
}

/// Starts the workload `args` in `pod` and waits until it listens on `port`; it runs until
/// its handle is killed or dropped (so a test kills exactly its own server).
pub(super) fn start_server(tb: &Testbed, pod: &Pod, port: u16, args: &[&str]) -> PodProcess {
    let mut command = Command::new(tb.workload_bin());
    command.args(args);
    let process = tb.spawn_in_pod(pod, command).expect("server started");
    tb.wait_listening(pod, port).expect("server listening");
    process
}

/// HTTP servers named after their pods on server-a and server-b, port `ZONED_PORT`, each
/// answering after its delay (ms); server-a's first.
fn start_http_servers(tb: &Testbed, delays: [&str; 2]) -> [PodProcess; 2] {
    let port = ZONED_PORT.to_string();
    [("server-a", delays[0]), ("server-b", delays[1])].map(|(name, delay)| {
        let pod = tb.pod("mesh", name).clone();
        let args = [
            "http-server",
            "--port",
            &port,
            "--name",
            name,
            "--delay-ms",
            delay,
        ];
        start_server(tb, &pod, ZONED_PORT, &args)
    })
}

/// The zoned Service: HTTP servers with these delays on server-a and server-b, its slice
/// with these zones. appProtocol http: detection waits for the first bytes however long a
/// loaded machine takes, so every request is an HTTP request the balancer places (and
/// counts).
fn start_zoned(
    tb: &Testbed,
    delays: [&str; 2],
    zones: [Option<&str>; 2],
) -> (Pod, Pod, [PodProcess; 2]) {
    let servers = start_http_servers(tb, delays);
    let (a, b) = (
        tb.pod("mesh", "server-a").clone(),
        tb.pod("mesh", "server-b").clone(),
    );
    apply_service_on(
        tb,
        ("zoned", ZONED, 80),
        Some("http"),
        &[&a, &b],
        ZONED_PORT,
    );
    apply_slice(tb, &a, &b, zones, false);
    (a, b, servers)
}

/// What node1 prefers of the Service at `vip`:80 when server-a is in its zone.
const PREFER_A: &str = r#"{"by":"zone","count":1,"region":0}"#;

/// The `zone_preference` of the Service at `vip`:80 in node1's config dump, as JSON text.
fn zoned_preference(dump: &Value, vip: &str) -> String {
    let vip = format!("{vip}:80");
    (Testbed::workload_services(dump).into_iter())
        .find(|s| s["virtual_address"] == vip.as_str())
        .map_or_else(String::new, |s| s["zone_preference"].to_string())
}

/// The value of the metric line starting with `series` on node1's `/metrics` (0 if none).
pub(super) fn metric(tb: &Testbed, series: &str) -> f64 {
    let (_, text) = tb.admin_get("node1", "/metrics").expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `count` sequential GETs from client-a to the zoned Service: (server → requests) and
/// whether every one was a 200.
fn sequential(tb: &Testbed, count: usize) -> (Value, bool) {
    let (summary, ok) = gets(tb, ZONED, count);
    (summary["servers"].clone(), ok)
}

/// `count` sequential GETs from client-a to `vip`:80: http-get's summary, and whether every
/// one was a 200.
fn gets(tb: &Testbed, vip: &str, count: usize) -> (Value, bool) {
    let target = format!("{vip}:80");
    let count = count.to_string();
    let (summary, ok) = workload(
        tb,
        &client(tb),
        &["http-get", "--target", &target, "--count", &count],
    );
    let ok = ok && summary["errors"].as_array().is_some_and(Vec::is_empty);
    (summary, ok)
}

fn served(servers: &Value, name: &str) -> u64 {
    servers[name].as_u64().unwrap_or(0)
}

/// The zoned Service's slice, its endpoints in zones `zones` (None: no zone), server-a's
/// marked terminating when `a_gone`.
fn apply_slice(tb: &Testbed, a: &Pod, b: &Pod, zones: [Option<&str>; 2], a_gone: bool) {
    let mut slice = cluster_state::endpoint_slice_object(
        "zoned",
        "http",
        ZONED_PORT,
        &[(a, a_gone), (b, false)],
    );
    cluster_state::set_endpoint_zones(&mut slice, &zones);
    tb.apply_object("endpointslice-zoned.yaml", &slice)
        .expect("endpoint slice");
}

/// Sends requests to `vip`:80 until node1's balancer estimates server-b faster than
/// server-a: the first request to server-b sets up its HBONE connection, and that slow
/// first answer is the peak its latency estimate decays from (over seconds, not requests).
/// The precondition for showing what latency alone would do.
fn until_latency_favours_server_b(tb: &Testbed, vip: &str) {
    let (a, b) = (tb.pod("mesh", "server-a"), tb.pod("mesh", "server-b"));
    let estimate = |dump: &Value, pod: &Pod| {
        let endpoint = format!("{}:{ZONED_PORT}", pod.ipv4());
        (dump["http_endpoints"].as_array().into_iter().flatten())
            .find(|e| e["endpoint"] == endpoint.as_str())
            .and_then(|e| e["latency_ms"].as_f64())
    };
    wait_until(
        Duration::from_secs(60),
        "latency favouring server-b",
        || {
            sequential_to(tb, vip, 10);
            let dump = tb.admin_json("node1", "/config_dump")?;
            Ok(matches!(
                (estimate(&dump, a), estimate(&dump, b)),
                (Some(a), Some(b)) if b < a
            ))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn requests_stay_in_the_zone_spill_the_excess_under_load_and_fail_over() {
    let (tb, _ca) = setup("nml7z");
    // server-a, in the client's zone, answers 5 ms later than server-b.
    let (a, b, _servers) = start_zoned(&tb, ["5", "0"], [None, None]);
    wait_for_dump(&tb, "four Services", |dump| {
        Testbed::workload_services(dump).len() == 4
    });

    // Without zones, latency decides: most requests go to the faster server-b.
    until_latency_favours_server_b(&tb, ZONED);
    let (servers, ok) = sequential(&tb, 200);
    assert!(ok, "{servers}");
    assert!(served(&servers, "server-b") > 100, "{servers}");
    println!("zones: without zones, server-b (other zone, faster) took {servers}");

    label_zones(&tb);
    apply_slice(&tb, &a, &b, [Some("zone-a"), Some("zone-b")], false);
    wait_for_dump(&tb, "node1 in zone-a preferring server-a", |dump| {
        dump["zones"]["local_zone"] == "zone-a" && zoned_preference(dump, ZONED) == PREFER_A
    });

    // Light load: every request stays in zone-a, although server-b answers faster.
    let (servers, ok) = sequential(&tb, 200);
    assert!(ok, "{servers}");
    assert_eq!(served(&servers, "server-a"), 200, "{servers}");

    // Sixteen clients at once keep more than four requests in flight at server-a: the
    // excess spills to zone-b, and server-a still takes its share.
    let runs: Vec<(Value, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| sequential(&tb, 50)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let (to_a, to_b) = runs.iter().fold((0, 0), |(a, b), (servers, ok)| {
        assert!(ok, "{servers}");
        (
            a + served(servers, "server-a"),
            b + served(servers, "server-b"),
        )
    });
    assert_eq!(to_a + to_b, 800);
    println!("zones: 16 clients at once: {to_a} kept in zone-a, {to_b} spilled to zone-b");
    assert!(to_b > 0 && to_a > 100, "spilled {to_b} of 800, kept {to_a}");
    let spills = |reason: &str| {
        metric(
            &tb,
            &format!(
                "nodemesh_zone_spills_total{{destination_service=\"zoned.mesh.svc.cluster.local\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(spills("overloaded"), to_b as f64, "every spill counted");
    let by_zone = |to: &str| {
        let same = if to == "zone-a" { "true" } else { "false" };
        metric(
            &tb,
            &format!(
                "nodemesh_zone_requests_total{{source_zone=\"zone-a\",destination_zone=\"{to}\",same_zone=\"{same}\"}}"
            ),
        )
    };
    assert_eq!(by_zone("zone-a"), (200 + to_a) as f64);
    assert_eq!(by_zone("zone-b"), to_b as f64);

    // Back to light load: back in the zone at once (the first pick sees at most two in
    // flight, the hysteresis' lower bound, and ends the spill).
    let (servers, ok) = sequential(&tb, 100);
    assert!(ok, "{servers}");
    assert_eq!(served(&servers, "server-a"), 100, "{servers}");

    // server-a leaves (terminating): zone-a has no ready endpoint, every request fails over
    // to zone-b, none fails.
    apply_slice(&tb, &a, &b, [Some("zone-a"), Some("zone-b")], true);
    let vip = format!("{ZONED}:80");
    wait_for_dump(&tb, "server-a gone from the Service", |dump| {
        Testbed::workload_services(dump).iter().any(|s| {
            s["virtual_address"] == vip.as_str()
                && s["ready_endpoints"].as_array().map(Vec::len) == Some(1)
        })
    });
    let (servers, ok) = sequential(&tb, 100);
    assert!(ok, "{servers}");
    assert_eq!(served(&servers, "server-b"), 100, "{servers}");
    assert_eq!(spills("unavailable"), 100.0);
}

/// `count` sequential GETs from client-a to `vip`:80: (server → requests).
fn sequential_to(tb: &Testbed, vip: &str, count: usize) -> Value {
    let (summary, ok) = gets(tb, vip, count);
    assert!(ok, "{summary}");
    summary["servers"].clone()
}

#[test]
fn traffic_that_leaves_the_zone_stays_in_the_region_while_the_region_keeps_up() {
    let (tb, _ca) = setup("nml7g");
    let (a, b) = (
        tb.pod("mesh", "server-a").clone(),
        tb.pod("mesh", "server-b").clone(),
    );
    // server-a answers 5 ms later than server-b.
    let _servers = start_http_servers(&tb, ["5", "0"]);
    // The client's node1 is in zone-a; server-a's endpoint is said to be in zone-b, server-b's
    // in zone-c (a third Node, only an API object, labels zone-c): neither in the client's
    // zone.
    label_zones(&tb);
    let api = tb.api().expect("a real API server");
    let node3: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node3", "labels": {"topology.kubernetes.io/zone": "zone-c"}},
    }))
    .expect("Node");
    api.apply(&node3).expect("node3");
    apply_service_on(
        &tb,
        ("regional", REGIONAL, 80),
        Some("http"),
        &[&a, &b],
        ZONED_PORT,
    );
    let mut slice = cluster_state::endpoint_slice_object(
        "regional",
        "http",
        ZONED_PORT,
        &[(&a, false), (&b, false)],
    );
    cluster_state::set_endpoint_zones(&mut slice, &[Some("zone-b"), Some("zone-c")]);
    tb.apply_object("endpointslice-regional.yaml", &slice)
        .expect("endpoint slice");
    wait_for_dump(&tb, "no endpoint in zone-a, no regions", |dump| {
        zoned_preference(dump, REGIONAL) == r#"{"by":"zone","count":0,"region":0}"#
    });
    // Without regions, latency decides between the two other zones: mostly server-b.
    until_latency_favours_server_b(&tb, REGIONAL);
    let servers = sequential_to(&tb, REGIONAL, 200);
    println!("regions: without regions {servers}");
    assert!(served(&servers, "server-b") > 100, "{servers}");

    // zone-a and zone-b in region-1, zone-c in region-2: every request goes to zone-b.
    let regions = [
        ("node1", "region-1"),
        ("node2", "region-1"),
        ("node3", "region-2"),
    ];
    api.label_nodes("topology.kubernetes.io/region", &regions)
        .expect("kubectl label node");
    wait_for_dump(&tb, "server-a in this region", |dump| {
        zoned_preference(dump, REGIONAL) == r#"{"by":"zone","count":0,"region":1}"#
    });
    let servers = sequential_to(&tb, REGIONAL, 200);
    assert_eq!(served(&servers, "server-a"), 200, "{servers}");

    // Sixteen clients at once overload the region's one endpoint: the excess goes on to the
    // other region.
    let runs: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| sequential_to(&tb, REGIONAL, 50)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let (to_a, to_b) = runs.iter().fold((0, 0), |(x, y), servers| {
        (
            x + served(servers, "server-a"),
            y + served(servers, "server-b"),
        )
    });
    println!("regions: 16 clients at once: {to_a} in the region, {to_b} beyond it");
    assert_eq!(to_a + to_b, 800);
    assert!(
        to_b > 0 && to_a > 100,
        "beyond {to_b} of 800, in the region {to_a}"
    );
}

/// The zoned Service's HTTPRoute with a retry policy (Gateway API's experimental channel).
const RETRY_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: zoned-retry, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: zoned}]
  rules:
    - retry: {attempts: 1, codes: [502, 503], backoff: 1ms}
      backendRefs: [{name: zoned, port: 80}]
";

#[test]
fn a_killed_local_endpoint_fails_over_to_the_other_zone_within_the_retry_policy() {
    let (tb, _ca) = setup_with("nml7k", GatewayApi::Experimental);
    label_zones(&tb);
    let (_, _, [server_a, _server_b]) =
        start_zoned(&tb, ["0", "0"], [Some("zone-a"), Some("zone-b")]);
    let route: serde_yaml::Value = serde_yaml::from_str(RETRY_ROUTE).expect("route");
    tb.apply_object("httproute-zoned-retry.yaml", &route)
        .expect("route");
    wait_for_dump(
        &tb,
        "node1 preferring server-a, with the retry route",
        |dump| {
            zoned_preference(dump, ZONED) == PREFER_A
                && dump["routes"].as_array().map(Vec::len) == Some(1)
        },
    );
    let (servers, ok) = sequential(&tb, 50);
    assert!(ok, "{servers}");
    assert_eq!(
        served(&servers, "server-a"),
        50,
        "in the zone first: {servers}"
    );

    // server-a's process dies; its endpoint stays in the slice as ready (as until the
    // kubelet and the EndpointSlice controller notice).
    server_a.kill().expect("server-a's server killed");
    // Every request succeeds: the first attempt at server-a fails, the retry avoids it and
    // goes to zone-b; after five failures in a row server-a is ejected and requests go to
    // zone-b at once.
    let (servers, ok) = sequential(&tb, 100);
    assert!(ok, "no request failed: {servers}");
    assert_eq!(served(&servers, "server-b"), 100, "{servers}");
    let spills = metric(
        &tb,
        "nodemesh_zone_spills_total{destination_service=\"zoned.mesh.svc.cluster.local\",reason=\"unavailable\"}",
    );
    assert!(
        spills >= 100.0,
        "every request spilled as unavailable: {spills}"
    );
}
