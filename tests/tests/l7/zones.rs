//! Zone-aware balancing on the testbed: node1 in zone-a, node2 in zone-b, a Service with
//! one endpoint in each, the one in the client's zone slower. Requests stay in the zone at
//! light load (where latency alone would send most away), spill the excess when the zone is
//! overloaded and come back, and fail over when the zone has no ready endpoint.

use super::*;

const ZONED: &str = "198.18.200.40";
const ZONED_PORT: u16 = 9090;

/// `count` sequential GETs from client-a to the zoned Service: (server → requests) and
/// whether every one was a 200.
fn sequential(tb: &Testbed, count: usize) -> (Value, bool) {
    let target = format!("{ZONED}:80");
    let count = count.to_string();
    let (summary, ok) = workload(
        tb,
        &client(tb),
        &["http-get", "--target", &target, "--count", &count],
    );
    (
        summary["servers"].clone(),
        ok && summary["errors"].as_array().is_some_and(Vec::is_empty),
    )
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
    for (endpoint, zone) in slice.endpoints.iter_mut().flatten().zip(zones) {
        endpoint.zone = zone.map(str::to_owned);
    }
    tb.apply_object("endpointslice-zoned.yaml", &slice)
        .expect("endpoint slice");
}

#[test]
fn requests_stay_in_the_zone_spill_the_excess_under_load_and_fail_over() {
    let (tb, _ca) = setup("nml7z");
    let a = tb.pod("mesh", "server-a").clone();
    let b = tb.pod("mesh", "server-b").clone();
    // server-a, in the client's zone, answers 5 ms later than server-b.
    let port = ZONED_PORT.to_string();
    for (pod, delay) in [(&a, "5"), (&b, "0")] {
        let args = [
            "http-server",
            "--port",
            &port,
            "--name",
            pod.name(),
            "--delay-ms",
            delay,
        ];
        tb.start_workload_server(pod, ZONED_PORT, &args)
            .expect("http-server listening");
    }
    apply_service_on(&tb, ("zoned", ZONED, 80), None, &[&a, &b], ZONED_PORT);
    apply_slice(&tb, &a, &b, [None, None], false);
    wait_for_dump(&tb, "four Services", |dump| {
        Testbed::workload_services(dump).len() == 4
    });

    // Without zones, latency decides: most requests go to the faster server-b.
    let (servers, ok) = sequential(&tb, 200);
    assert!(ok, "{servers}");
    assert!(served(&servers, "server-b") > 100, "{servers}");
    println!("zones: without zones, server-b (other zone, faster) took {servers}");

    let api = tb.api().expect("a real API server");
    for (node, zone) in [("node1", "zone-a"), ("node2", "zone-b")] {
        api.kubectl_ok(&[
            "label",
            "node",
            node,
            &format!("topology.kubernetes.io/zone={zone}"),
        ])
        .expect("kubectl label node");
    }
    apply_slice(&tb, &a, &b, [Some("zone-a"), Some("zone-b")], false);
    wait_for_dump(&tb, "node1 in zone-a", |dump| {
        dump["zones"]["local_zone"] == "zone-a"
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
}
