use super::*;

#[test]
fn the_prometheus_text_format_names_counters_by_their_sample() {
    let openmetrics = "# HELP istio_requests HTTP requests.\n# TYPE istio_requests counter\nistio_requests_total{a=\"b\"} 3\n# HELP up Up.\n# TYPE up gauge\n# UNIT up seconds\nup 1\n# EOF\n";
    assert_eq!(
        openmetrics_to_prometheus_text(openmetrics),
        "# HELP istio_requests_total HTTP requests.\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"b\"} 3\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
    );
    assert_eq!(Exposition::negotiate(None), Exposition::PrometheusText);
    assert_eq!(
        Exposition::negotiate(Some(
            "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.5"
        )),
        Exposition::OpenMetrics
    );
}

fn traffic(destination: &str) -> Traffic {
    Traffic {
        reporter: Reporter::Source,
        source: Peer {
            workload: "client".into(),
            namespace: "shop".into(),
            principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
        },
        destination: Peer {
            workload: destination.into(),
            namespace: "shop".into(),
            principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
        },
        destination_service: "web.shop.svc.cluster.local".into(),
        mutual_tls: true,
    }
}

#[test]
fn istio_names_and_labels_and_exact_counts() {
    let metrics = Metrics::default();
    for _ in 0..3 {
        metrics.request(&traffic("web"), "http", 200, Duration::from_millis(7));
    }
    metrics.request(&traffic("web"), "http", 503, Duration::from_millis(1));
    metrics.tcp_opened(&traffic("db"));
    metrics.tcp_closed(&traffic("db"), 100, 2000);
    metrics.detected(DetectionOutcome::Http1);
    let text = metrics.encode(Exposition::OpenMetrics);
    let labels = "connection_security_policy=\"mutual_tls\"";
    assert!(text.contains("istio_requests_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",destination_workload=\"web\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"web.shop.svc.cluster.local\",request_protocol=\"http\",response_code=\"200\","), "{text}");
    assert!(
        text.contains(&format!("response_code=\"200\",{labels}}} 3")),
        "{text}"
    );
    assert!(
        text.contains(&format!("response_code=\"503\",{labels}}} 1")),
        "{text}"
    );
    assert!(
        text.contains("istio_request_duration_milliseconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",destination_workload=\"db\""), "{text}");
    assert!(
        text.contains(&format!("request_protocol=\"tcp\",{labels}}} 2000")),
        "{text}"
    );
    assert!(
        text.contains("nodemesh_protocol_detection_total{outcome=\"http1\"} 1"),
        "{text}"
    );
}

#[test]
fn the_grafana_dashboard_uses_only_metrics_the_agent_exports() {
    let metrics = Metrics::default();
    metrics.request(&traffic("web"), "http", 200, Duration::from_millis(1));
    metrics.tcp_opened(&traffic("db"));
    metrics.tcp_closed(&traffic("db"), 1, 1);
    metrics.detected(DetectionOutcome::Http1);
    metrics.set_agent_state(1, &[("enrolled_cgroups".into(), 1)], &[("id".into(), 1)], 0);
    metrics
        .zone_series(&zones("zone-a", Some("zone-b")))
        .requests
        .inc();
    metrics.zone_connection(&zones("zone-a", Some("zone-b")), 10);
    metrics.zone_spill("shop/web", "unavailable");
    let exported = metrics.encode(Exposition::OpenMetrics);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/nodemesh-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let names = regex::Regex::new(r"\b(?:istio|nodemesh)_[a-z_]+").unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in names.find_iter(expr) {
                let name = name.as_str();
                assert!(
                    exported.lines().any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                    "panel {:?} uses {name}, which the agent does not export",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "{checked}");
}

fn zones(source: &str, destination: Option<&str>) -> ZonePair {
    ZonePair {
        source: source.into(),
        destination: destination.map(Into::into),
    }
}

#[test]
fn traffic_by_zone_and_spills() {
    let metrics = Metrics::default();
    metrics
        .zone_series(&zones("zone-a", Some("zone-a")))
        .requests
        .inc();
    metrics
        .zone_series(&zones("zone-a", Some("zone-a")))
        .requests
        .inc();
    metrics.zone_series(&zones("zone-a", None)).requests.inc();
    metrics
        .zone_series(&zones("zone-a", Some("zone-b")))
        .bytes
        .inc_by(100);
    metrics.zone_connection(&zones("zone-a", Some("zone-b")), 20);
    metrics.zone_spill("shop/web", "overloaded");
    let text = metrics.encode(Exposition::PrometheusText);
    for line in [
        "nodemesh_zone_requests_total{source_zone=\"zone-a\",destination_zone=\"zone-a\",same_zone=\"true\"} 2",
        "nodemesh_zone_requests_total{source_zone=\"zone-a\",destination_zone=\"unknown\",same_zone=\"false\"} 1",
        "nodemesh_zone_bytes_total{source_zone=\"zone-a\",destination_zone=\"zone-b\",same_zone=\"false\"} 120",
        "nodemesh_zone_connections_total{source_zone=\"zone-a\",destination_zone=\"zone-b\",same_zone=\"false\"} 1",
        "nodemesh_zone_spills_total{destination_service=\"web.shop.svc.cluster.local\",reason=\"overloaded\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[test]
fn label_sets_are_bounded() {
    let metrics = Metrics::default();
    for i in 0..(MAX_SERIES + 10) {
        metrics.tcp_opened(&traffic(&format!("w{i}")));
    }
    let text = metrics.encode(Exposition::OpenMetrics);
    let series = text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .count();
    assert_eq!(series, MAX_SERIES + 1, "the rest is counted under `other`");
    assert!(text.contains("destination_workload=\"other\""));
}

#[test]
fn zone_label_sets_are_bounded_too() {
    let metrics = Metrics::default();
    for i in 0..(MAX_SERIES + 10) {
        metrics
            .zone_series(&zones("zone-a", Some(&format!("z{i}"))))
            .requests
            .inc();
    }
    let text = metrics.encode(Exposition::OpenMetrics);
    let series = (text.lines())
        .filter(|l| l.starts_with("nodemesh_zone_requests_total{"))
        .count();
    assert_eq!(series, MAX_SERIES + 1, "the rest is counted under `other`");
    assert!(text.contains("nodemesh_zone_requests_total{source_zone=\"other\",destination_zone=\"other\",same_zone=\"false\"} 10"));
}
