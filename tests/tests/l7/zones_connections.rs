//! Zone-aware choice of connections relayed as TCP on the testbed (node1 in zone-a, node2
//! in zone-b, banner servers on server-a and server-b): connections stay in the zone, follow
//! the EndpointSlice's zone hints, and the Service's annotations turn the preference off (a
//! rejected annotation is reported and changes nothing); a connection whose endpoint is
//! dead is dialled to the next one; `nodemesh status` says what leaves the zone.

use serde_json::json;

use super::{
    zones::{label_zones, metric, start_server},
    *,
};

/// A Service relayed as TCP (`appProtocol: tcp`) to banner servers.
const BANNER: &str = "198.18.200.42";
const BANNER_PORT: u16 = 2626;

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
    let port = BANNER_PORT.to_string();
    let [server_a, _server_b] = ["server-a", "server-b"].map(|name| {
        let pod = tb.pod("mesh", name).clone();
        let args = ["banner-server", "--port", &port, "--name", name];
        start_server(&tb, &pod, BANNER_PORT, &args)
    });
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

    // Valid again, no hints: server-a's. Then its banner server is killed outright, its
    // endpoint still ready: every connection is still served, by server-b (a failed connect
    // moves on to the next endpoint before the client sees anything; after five failures
    // server-a is ejected).
    apply_banner_service(&tb, &[]);
    apply_banner_slice(&tb, ["", ""], false);
    wait_for_dump(&tb, "the default policy again", |dump| {
        banner_port(dump)["zone_preference"] == json!({"by": "zone", "count": 1, "region": 0})
            && dump["config_errors"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(banners(&tb, 2), json!({"server-a": 2}));
    server_a.kill().expect("server-a's banner server killed");
    assert_eq!(banners(&tb, 20), json!({"server-b": 20}));

    // server-a terminating: zone-a has nothing; connections fail over and `nodemesh status`
    // says so.
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
