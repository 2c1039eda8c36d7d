//! Zone-aware balancing on the testbed: node1 in zone-a, node2 in zone-b, a Service with
//! one endpoint in each, the one in the client's zone slower. Requests stay in the zone at
//! light load (where latency alone would send most away), spill the excess when the zone is
//! overloaded and come back, and fail over when the zone has no ready endpoint; the spills
//! are counted by reason. Connections relayed as TCP stay in the zone too, follow the
//! EndpointSlice's zone hints, and the Service's annotations turn the preference off (a
//! rejected annotation is reported and changes nothing); `nodemesh status` says what leaves
//! the zone. With regions, traffic that must leave the zone stays in the region while the
//! region keeps up.

use serde_json::json;

use super::*;

const ZONED: &str = "198.18.200.40";
const ZONED_PORT: u16 = 9090;
/// A Service whose endpoints are in other zones than the client's, one in its region.
const REGIONAL: &str = "198.18.200.43";
/// A Service relayed as TCP (`appProtocol: tcp`) to banner servers.
const BANNER: &str = "198.18.200.42";
const BANNER_PORT: u16 = 2626;

/// Labels node1 into zone-a and node2 into zone-b through the API server.
fn label_zones(tb: &Testbed) {
    let api = tb.api().expect("a real API server");
    for (node, zone) in [("node1", "zone-a"), ("node2", "zone-b")] {
        let label = format!("topology.kubernetes.io/zone={zone}");
        api.kubectl_ok(&["label", "node", node, &label])
            .expect("kubectl label node");
    }
}

/// The value of the metric line starting with `series` on node1's `/metrics` (0 if none).
fn metric(tb: &Testbed, series: &str) -> f64 {
    let (_, text) = tb.admin_get("node1", "/metrics").expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

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
    // appProtocol http: detection waits for the first bytes however long a loaded machine
    // takes, so every request is an HTTP request the balancer places (and counts).
    apply_service_on(
        &tb,
        ("zoned", ZONED, 80),
        Some("http"),
        &[&a, &b],
        ZONED_PORT,
    );
    apply_slice(&tb, &a, &b, [None, None], false);
    wait_for_dump(&tb, "four Services", |dump| {
        Testbed::workload_services(dump).len() == 4
    });

    // Without zones, latency decides: most requests go to the faster server-b.
    let (servers, ok) = sequential(&tb, 200);
    assert!(ok, "{servers}");
    assert!(served(&servers, "server-b") > 100, "{servers}");
    println!("zones: without zones, server-b (other zone, faster) took {servers}");

    label_zones(&tb);
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

/// `count` connections from client-a to the banner Service: (server → connections).
fn banners(tb: &Testbed, count: u32) -> Value {
    let target = format!("{BANNER}:80");
    let (summary, ok) = workload(
        tb,
        &client(tb),
        &[
            "read-banner",
            "--target",
            &target,
            "--count",
            &count.to_string(),
        ],
    );
    assert!(ok, "{summary}");
    summary["servers"].clone()
}

/// The banner Service, with `annotations`.
fn apply_banner_service(tb: &Testbed, annotations: &[(&str, &str)]) {
    let mut service = cluster_state::service_object("mesh", "banner", BANNER, 80, "http");
    if let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        ports[0].app_protocol = Some("tcp".into());
    }
    service.metadata.annotations = Some(
        (annotations.iter())
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    tb.apply_object("service-banner.yaml", &service)
        .expect("service");
}

/// The banner Service's slice: server-a in zone-a, server-b in zone-b, with these zone hints
/// (none when empty); server-a terminating when `a_gone`.
fn apply_banner_slice(tb: &Testbed, hints: [&str; 2], a_gone: bool) {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
    let (a, b) = (tb.pod("mesh", "server-a"), tb.pod("mesh", "server-b"));
    let mut slice = cluster_state::endpoint_slice_object(
        "banner",
        "http",
        BANNER_PORT,
        &[(a, a_gone), (b, false)],
    );
    let endpoints = slice.endpoints.iter_mut().flatten();
    for ((endpoint, zone), hint) in endpoints.zip(["zone-a", "zone-b"]).zip(hints) {
        endpoint.zone = Some(zone.into());
        endpoint.hints = (!hint.is_empty()).then(|| EndpointHints {
            for_zones: Some(vec![ForZone { name: hint.into() }]),
            for_nodes: None,
        });
    }
    tb.apply_object("endpointslice-banner.yaml", &slice)
        .expect("endpoint slice");
}

/// The banner Service's port in node1's config dump.
fn banner_port(dump: &Value) -> Value {
    let vip = format!("{BANNER}:80");
    (Testbed::workload_services(dump).into_iter())
        .find(|s| s["virtual_address"] == vip.as_str())
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn connections_stay_in_the_zone_follow_hints_and_the_services_annotations() {
    let (tb, _ca) = setup("nml7t");
    label_zones(&tb);
    for name in ["server-a", "server-b"] {
        let pod = tb.pod("mesh", name).clone();
        let port = BANNER_PORT.to_string();
        let args = ["banner-server", "--port", &port, "--name", name];
        tb.start_workload_server(&pod, BANNER_PORT, &args)
            .expect("banner-server listening");
    }
    apply_banner_service(&tb, &[]);
    apply_banner_slice(&tb, ["", ""], false);
    wait_for_dump(&tb, "node1 in zone-a preferring server-a", |dump| {
        dump["zones"]["local_zone"] == "zone-a"
            && banner_port(dump)["zone_preference"]
                == json!({"by": "zone", "count": 1, "region": 0})
    });

    // Per connection: every one to the endpoint in the zone, counted by zone.
    assert_eq!(banners(&tb, 20), json!({"server-a": 20}));
    let connections = |to: &str, same: &str| {
        metric(
            &tb,
            &format!(
                "nodemesh_zone_connections_total{{source_zone=\"zone-a\",destination_zone=\"{to}\",same_zone=\"{same}\"}}"
            ),
        )
    };
    // A connection is counted when the proxy has closed it, just after the client did.
    wait_until(
        Duration::from_secs(10),
        "20 connections counted in zone-a",
        || Ok(connections("zone-a", "true") == 20.0),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // The EndpointSlice controller's hints (as it writes them for `trafficDistribution:
    // PreferClose`) outrank the zones: here it gave zone-a's clients server-b.
    apply_banner_slice(&tb, ["zone-b", "zone-a"], false);
    wait_for_dump(&tb, "zone hints in force", |dump| {
        banner_port(dump)["zone_preference"]["by"] == "zone_hints"
    });
    assert_eq!(banners(&tb, 20), json!({"server-b": 20}));
    wait_until(
        Duration::from_secs(10),
        "20 connections counted to zone-b",
        || Ok(connections("zone-b", "false") == 20.0),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // `nodemesh.io/zone-affinity: off`: no preference, both endpoints in turn.
    apply_banner_service(&tb, &[("nodemesh.io/zone-affinity", "off")]);
    wait_for_dump(&tb, "the preference off", |dump| {
        let port = banner_port(dump);
        port["zone_policy"]["affinity"] == "off" && port["zone_preference"].is_null()
    });
    assert_eq!(banners(&tb, 20), json!({"server-a": 10, "server-b": 10}));

    // A rejected annotation is reported; the last good policy (off) stays.
    apply_banner_service(
        &tb,
        &[
            ("nodemesh.io/zone-affinity", "load"),
            ("nodemesh.io/zone-spill-at", "lots"),
        ],
    );
    wait_for_dump(&tb, "the bad annotation reported", |dump| {
        (dump["config_errors"].as_array().into_iter().flatten()).any(|e| {
            e.as_str().is_some_and(|e| {
                e.starts_with("Service mesh/banner: annotation nodemesh.io/zone-spill-at=\"lots\"")
            })
        })
    });
    assert_eq!(
        banner_port(&tb.admin_json("node1", "/config_dump").expect("dump"))["zone_policy"]["affinity"],
        "off"
    );
    assert_eq!(banners(&tb, 2), json!({"server-a": 1, "server-b": 1}));

    // Valid again, no hints, server-a terminating: zone-a has nothing; connections fail over
    // and `nodemesh status` says so.
    apply_banner_service(&tb, &[]);
    apply_banner_slice(&tb, ["", ""], true);
    wait_for_dump(&tb, "zone-a without a ready endpoint", |dump| {
        banner_port(dump)["zone_preference"] == json!({"by": "zone", "count": 0, "region": 0})
            && dump["config_errors"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(banners(&tb, 5), json!({"server-b": 5}));
    let mut status = Command::new("ip");
    let netns = tb.node("node1").expect("node").netns().to_owned();
    status.args(["netns", "exec", &netns]);
    status.arg(tb.nodemesh_bin()).arg("status");
    let output = status.output().expect("nodemesh status");
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}");
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("\nZONE zone-a: ")
            && report
                .lines()
                .any(|l| l.trim_start().starts_with("mesh/banner")
                    && l.ends_with("no ready endpoint preferred here: failing over")),
        "{report}"
    );
}

/// `count` sequential GETs from client-a to `vip`:80: (server → requests).
fn sequential_to(tb: &Testbed, vip: &str, count: usize) -> Value {
    let target = format!("{vip}:80");
    let count = count.to_string();
    let (summary, ok) = workload(
        tb,
        &client(tb),
        &["http-get", "--target", &target, "--count", &count],
    );
    assert!(
        ok && summary["errors"].as_array().is_some_and(Vec::is_empty),
        "{summary}"
    );
    summary["servers"].clone()
}

#[test]
fn traffic_that_leaves_the_zone_stays_in_the_region_while_the_region_keeps_up() {
    let (tb, _ca) = setup("nml7r");
    let (a, b) = (
        tb.pod("mesh", "server-a").clone(),
        tb.pod("mesh", "server-b").clone(),
    );
    // server-a answers 5 ms later than server-b.
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
    for (endpoint, zone) in slice
        .endpoints
        .iter_mut()
        .flatten()
        .zip(["zone-b", "zone-c"])
    {
        endpoint.zone = Some(zone.into());
    }
    tb.apply_object("endpointslice-regional.yaml", &slice)
        .expect("endpoint slice");
    let port_of = |dump: &Value| {
        let vip = format!("{REGIONAL}:80");
        (Testbed::workload_services(dump).into_iter())
            .find(|s| s["virtual_address"] == vip.as_str())
            .map_or(Value::Null, |s| s["zone_preference"].clone())
    };
    wait_for_dump(&tb, "no endpoint in zone-a, no regions", |dump| {
        port_of(dump) == json!({"by": "zone", "count": 0, "region": 0})
    });
    // Without regions, latency decides between the two other zones: mostly server-b.
    let servers = sequential_to(&tb, REGIONAL, 200);
    println!("regions: without regions {servers}");
    assert!(served(&servers, "server-b") > 100, "{servers}");

    // zone-a and zone-b in region-1, zone-c in region-2: every request goes to zone-b.
    for (node, region) in [
        ("node1", "region-1"),
        ("node2", "region-1"),
        ("node3", "region-2"),
    ] {
        let label = format!("topology.kubernetes.io/region={region}");
        api.kubectl_ok(&["label", "node", node, &label])
            .expect("kubectl label node");
    }
    wait_for_dump(&tb, "server-a in this region", |dump| {
        port_of(dump) == json!({"by": "zone", "count": 0, "region": 1})
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
