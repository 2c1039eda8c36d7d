//! Telemetry on the testbed (a real API server), after known traffic: the Prometheus metrics
//! equal what was sent (requests by status, connections, bytes) with the right SPIFFE
//! principals, both on the agent's page and as a real Prometheus scraped them with the scrape
//! job docs/telemetry.md documents; `promtool check metrics` passes; every query of the
//! Grafana dashboard returns data from that Prometheus; access log lines parse as JSON with
//! both identities; a real OpenTelemetry Collector receives the proxy's span in the client's
//! trace; `nodemesh status` and `nodemesh top` (in a tmux pseudo-terminal) show the node.
//! Needs root.

use std::{process::Command, time::Duration};

use nodemesh::cli::prometheus;

use nodemesh_testbed::{
    AgentOptions, MeshCa, Testbed, TestbedConfig, Tmux, TopologySpec, cluster_state, docs, is_root,
    observability::{OtelCollector, Prometheus},
    wait_until,
};
use serde_json::Value;

const WEB: &str = "198.18.200.40";
/// A Service whose endpoint is outside the mesh (plain/outsider): requests without mTLS.
const LEGACY: &str = "198.18.200.41";
const APP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
/// The port on the node's address (`status.hostIP`) where the chart has agents serve
/// `/metrics` for Prometheus.
const METRICS_PORT: u16 = 15090;
/// The traceparent the client sends on its traced request.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

struct Telemetry {
    tb: Testbed,
    _ca: MeshCa,
    collector: OtelCollector,
    prometheus: Prometheus,
}

/// A meshed testbed whose agents export spans to an OpenTelemetry Collector and are scraped
/// by Prometheus, with an HTTP server and an echo server on server-b behind Service `web`,
/// and an HTTP server on plain/outsider behind Service `legacy`.
fn setup(prefix: &str) -> Telemetry {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace(prefix).expect("config");
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    let api = tb.api().expect("a real API server");
    let collector = api.start_otel_collector().expect("collector");
    let scrape = docs::example("telemetry.md", "prometheus-scrape").expect("scrape job");
    let scrape = serde_yaml::to_string(&scrape).expect("scrape YAML");
    let prometheus = api.start_prometheus(&scrape).expect("prometheus");
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 3600).expect("CA");
    for node in ["node1", "node2"] {
        let mut extra_args = ca.agent_args(node);
        extra_args.extend([
            "--otlp-endpoint".to_owned(),
            api.otlp_traces_endpoint(),
            "--metrics-addr".to_owned(),
            format!("{}:{METRICS_PORT}", tb.node(node).expect("node").ipv4()),
        ]);
        tb.start_agent(
            node,
            &AgentOptions {
                extra_args,
                ..Default::default()
            },
        )
        .expect("agent");
    }
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_http_server(&server, APP_PORT)
        .expect("http server");
    let mut echo = Command::new(tb.workload_bin());
    echo.args(["echo-server", "--ports", &ECHO_PORT.to_string()]);
    tb.spawn_in_pod(&server, echo).expect("echo").detach();
    tb.wait_listening(&server, ECHO_PORT)
        .expect("echo listening");
    let service = cluster_state::service_object("mesh", "web", WEB, 80, "http");
    tb.apply_object("service-web.yaml", &service)
        .expect("service");
    // Zones, so the dashboard's zone panels have data: the client's node1 in zone-a, web's
    // endpoint on node2 in zone-b (every request to it leaves the zone: none is there).
    let zones = [("node1", "zone-a"), ("node2", "zone-b")];
    api.label_nodes("topology.kubernetes.io/zone", &zones)
        .expect("kubectl label node");
    let mut slice =
        cluster_state::endpoint_slice_object("web", "http", APP_PORT, &[(&server, false)]);
    cluster_state::set_endpoint_zones(&mut slice, &[Some("zone-b")]);
    tb.apply_object("endpointslice-web.yaml", &slice)
        .expect("slice");
    let outsider = tb.pod("plain", "outsider").clone();
    tb.start_http_server(&outsider, APP_PORT)
        .expect("legacy http server");
    let legacy = cluster_state::service_object("plain", "legacy", LEGACY, 80, "http");
    tb.apply_object("service-legacy.yaml", &legacy)
        .expect("service");
    let slice =
        cluster_state::endpoint_slice_object("legacy", "http", APP_PORT, &[(&outsider, false)]);
    tb.apply_object("endpointslice-legacy.yaml", &slice)
        .expect("slice");
    wait_until(
        Duration::from_secs(10),
        "Services and node1's zone loaded",
        || {
            let dump = tb.admin_json("node1", "/config_dump")?;
            Ok(Testbed::workload_services(&dump).len() == 2
                && dump["zones"]["local_zone"] == "zone-a")
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Telemetry {
        tb,
        _ca: ca,
        collector,
        prometheus,
    }
}

/// The sum of a node's /metrics samples named `name` whose labels include all of `wanted`.
fn metric(tb: &Testbed, node: &str, name: &str, wanted: &[(&str, &str)]) -> f64 {
    let (status, text) = tb.admin_get(node, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    prometheus::parse(&text)
        .iter()
        .filter(|sample| sample.name == name && sample.has_labels(wanted))
        .map(|sample| sample.value)
        .sum()
}

fn run(tb: &Testbed, pod: (&str, &str), program: &str, args: &[&str]) -> String {
    let pod = tb.pod(pod.0, pod.1).clone();
    let mut command = Command::new(program);
    command.args(args);
    let output = tb.run_in_pod(&pod, command).expect("run");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const CLIENT_A: &str = "spiffe://cluster.local/ns/mesh/sa/client-a";
const SERVER_B: &str = "spiffe://cluster.local/ns/mesh/sa/server-b";

#[test]
fn metrics_access_logs_and_traces_match_the_traffic_sent() {
    let t = setup("nmtel");
    let tb = &t.tb;
    let client = ("mesh", "client-a");
    let workload = tb.workload_bin().display().to_string();
    // 10 requests answered 200 (one keep-alive connection), 3 answered 503, one traced.
    run(
        tb,
        client,
        &workload,
        &[
            "http-get",
            "--target",
            &format!("{WEB}:80"),
            "--path",
            "/echo/m",
            "--count",
            "10",
        ],
    );
    for _ in 0..3 {
        run(
            tb,
            client,
            "curl",
            &["-s", "-o", "/dev/null", &format!("http://{WEB}/status/503")],
        );
    }
    let traceparent = format!("traceparent: 00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let traced = run(
        tb,
        client,
        "curl",
        &[
            "-s",
            "-H",
            &traceparent,
            &format!("http://{WEB}/echo/traced"),
        ],
    );
    let seen: Value = serde_json::from_str(&traced).expect("echo");
    let forwarded = seen["headers"]["traceparent"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        forwarded.starts_with(&format!("00-{TRACE_ID}-")) && !forwarded.contains(CLIENT_SPAN),
        "the application sees the trace with the proxy's span as parent: {forwarded}"
    );
    // 3 opaque connections of 64 KiB each way to the pod's address.
    run(
        tb,
        client,
        &workload,
        &[
            "echo-client",
            "--target",
            &format!("{}:{ECHO_PORT}", tb.pod("mesh", "server-b").ipv4()),
            "--bytes",
            "65536",
            "--connections",
            "3",
        ],
    );

    let http = [
        ("reporter", "source"),
        ("source_workload", "client-a"),
        ("source_workload_namespace", "mesh"),
        ("source_principal", CLIENT_A),
        ("destination_workload", "server-b"),
        ("destination_workload_namespace", "mesh"),
        ("destination_principal", SERVER_B),
        ("destination_service", "web.mesh.svc.cluster.local"),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with_code = |code| {
        let mut labels = http.to_vec();
        labels.push(("response_code", code));
        labels
    };
    assert_eq!(
        metric(tb, "node1", "istio_requests_total", &with_code("200")),
        11.0
    );
    assert_eq!(
        metric(tb, "node1", "istio_requests_total", &with_code("503")),
        3.0
    );
    assert_eq!(
        metric(
            tb,
            "node1",
            "istio_request_duration_milliseconds_count",
            &with_code("200")
        ),
        11.0
    );

    // Opaque TCP, as both ends report it; bytes are the applications' bytes, exactly. The
    // proxy finishes a connection's accounting when both directions have closed.
    let tcp = |reporter| {
        vec![
            ("reporter", reporter),
            ("source_principal", CLIENT_A),
            ("destination_workload", "server-b"),
            ("destination_principal", SERVER_B),
            ("request_protocol", "tcp"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    wait_until(Duration::from_secs(5), "connections closed", || {
        Ok(metric(
            tb,
            "node1",
            "istio_tcp_connections_closed_total",
            &tcp("source"),
        ) == 3.0)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        metric(
            tb,
            "node1",
            "istio_tcp_connections_opened_total",
            &tcp("source")
        ),
        3.0
    );
    assert_eq!(
        metric(tb, "node1", "istio_tcp_sent_bytes_total", &tcp("source")),
        196608.0
    );
    assert_eq!(
        metric(
            tb,
            "node1",
            "istio_tcp_received_bytes_total",
            &tcp("source")
        ),
        196608.0
    );
    // At the destination the HTTP requests' HBONE streams are connections too (no policy
    // there parses them); the echo connections are the ones to port 7000's workload.
    let mut echo_at_destination = tcp("destination");
    echo_at_destination.push(("source_workload", "client-a"));
    wait_until(Duration::from_secs(5), "destination accounted", || {
        Ok(metric(
            tb,
            "node2",
            "istio_tcp_sent_bytes_total",
            &echo_at_destination,
        ) >= 196608.0)
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // The agent's own metrics.
    let (_, text) = tb.admin_get("node1", "/metrics").expect("metrics");
    assert!(text.contains("nodemesh_enrolled_pods 2"), "{text}");
    assert!(
        metric(
            tb,
            "node1",
            "nodemesh_certificate_expiry_seconds",
            &[("identity", CLIENT_A)]
        ) > 3000.0
    );
    assert!(
        metric(
            tb,
            "node1",
            "nodemesh_protocol_detection_total",
            &[("outcome", "http1")]
        ) >= 5.0
    );

    // Access log lines: JSON, both identities, route, status, duration, trace id. The agent
    // writes them in batches (at least every 100 ms): wait for the echo connections' lines,
    // the last traffic sent.
    let access_lines = || -> Vec<Value> {
        tb.agent_log("node1")
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &Value| v["target"] == "nodemesh::access")
            .collect()
    };
    let echo_line = |l: &&Value| {
        l["kind"] == "connection" && l["dst_workload"] == "server-b" && l["bytes_sent"] == 65536
    };
    wait_until(
        Duration::from_secs(10),
        "the echo connections' access log lines",
        || Ok(access_lines().iter().filter(echo_line).count() >= 3),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let lines = access_lines();
    let traced_line = lines
        .iter()
        .find(|l| l["kind"] == "request" && l["path"] == "/echo/traced")
        .unwrap_or_else(|| {
            panic!(
                "no access log line for the traced request in {} lines",
                lines.len()
            )
        });
    assert_eq!(traced_line["src_principal"], CLIENT_A);
    assert_eq!(traced_line["dst_principal"], SERVER_B);
    assert_eq!(traced_line["status"], 200);
    assert_eq!(traced_line["trace_id"], TRACE_ID);
    assert!(traced_line["duration_ms"].as_f64().is_some());
    let connection_lines = lines.iter().filter(echo_line).count();
    assert_eq!(connection_lines, 3, "one line per echo connection");

    // The collector receives the proxy's span, child of the client's.
    wait_until(Duration::from_secs(10), "span exported", || {
        Ok(t.collector.spans().iter().any(|s| {
            s["traceId"] == TRACE_ID
                && s["parentSpanId"] == CLIENT_SPAN
                && s["name"] == "GET /echo/traced"
        }))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(t.collector.output()).unwrap_or_default()
        )
    });

    // Prometheus scraped the same counts through the documented scrape job.
    let scraped = |query: &str, expected: f64| {
        wait_until(Duration::from_secs(15), query, || {
            Ok(t.prometheus.value(query)? == expected)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}; targets: {}",
                t.prometheus.targets().unwrap_or_default()
            )
        });
    };
    scraped(
        &format!(
            r#"sum(istio_requests_total{{node="node1",reporter="source",source_principal="{CLIENT_A}",destination_service="web.mesh.svc.cluster.local",response_code="200"}})"#
        ),
        11.0,
    );
    scraped(
        &format!(
            r#"sum(istio_tcp_sent_bytes_total{{node="node1",reporter="source",source_principal="{CLIENT_A}",destination_principal="{SERVER_B}",request_protocol="tcp"}})"#
        ),
        196608.0,
    );

    // promtool, Prometheus's own linter, accepts the exposition.
    let (_, exposition) = tb.admin_get("node1", "/metrics").expect("metrics");
    let promtool = tb
        .api()
        .unwrap()
        .testenv()
        .bin("promtool")
        .expect("promtool");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), exposition.as_bytes()).unwrap();
    let checked = check.wait_with_output().expect("promtool");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Istio's name, kept for its dashboards, is the one finding (docs/telemetry.md).
    let unexpected: Vec<&str> = findings
        .lines()
        .filter(|l| {
            !l.trim().is_empty()
                && *l
                    != r#"istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics ({}): {findings}",
        checked.status
    );

    // Every query of the Grafana dashboard returns data from that Prometheus.
    run(
        tb,
        client,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{LEGACY}/echo/plain"),
        ],
    );
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/nodemesh-dashboard.json"),
        )
        .expect("dashboard"),
    )
    .expect("dashboard JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            let query = expr.replace("$service", ".*");
            wait_until(
                Duration::from_secs(20),
                &format!("data for panel {}: {query}", panel["title"]),
                || Ok(!t.prometheus.query(&query)?.is_empty()),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Runs `nodemesh <args>` in `node`'s network namespace (where the admin API listens).
fn nodemesh_on(tb: &Testbed, node: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", tb.node(node).expect("node").netns()]);
    command.arg(tb.nodemesh_bin());
    command.args(args);
    command
}

#[test]
fn status_and_top_show_the_node() {
    let t = setup("nmtop");
    let tb = &t.tb;
    let status = nodemesh_on(tb, "node1", &["status"])
        .output()
        .expect("status");
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(report.starts_with("node node1: ready"), "{report}");
    assert!(report.contains("mesh/client-a"), "{report}");
    assert!(
        report.contains(CLIENT_A) && report.contains("expires in"),
        "{report}"
    );
    // Every Service port the agent knows: `web`, `legacy` and what the cluster brings.
    let dump = tb.admin_json("node1", "/config_dump").expect("config dump");
    let services = dump["services"].as_array().map(Vec::len).unwrap_or(0);
    assert!(services >= 2, "{dump}");
    assert!(report.contains(&format!("SERVICES {services}")), "{report}");

    // A steady stream of requests from client-a while top runs in a tmux pane.
    let client = tb.pod("mesh", "client-a").clone();
    let mut load = Command::new(tb.workload_bin());
    load.args([
        "http-get",
        "--target",
        &format!("{WEB}:80"),
        "--count",
        "1000000",
    ]);
    let _load = tb.spawn_in_pod(&client, load).expect("load");
    let top = nodemesh_on(tb, "node1", &["top"]);
    let command_line = format!(
        "{} {}",
        top.get_program().to_string_lossy(),
        top.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let tmux = Tmux::new(&format!("{}-top", tb.name()), 160, 20);
    tmux.start(&command_line);
    let shown = tmux.wait_screen(Duration::from_secs(15), "top shows client-a → web", |s| {
        s.lines().any(|l| {
            l.contains("mesh/client-a")
                && l.contains("web.mesh.svc.cluster.local")
                && l.contains("100.0%")
        })
    });
    tmux.send_keys("q");
    let screen =
        shown.unwrap_or_else(|e| panic!("top did not show client-a → web at 100% success: {e}"));
    assert!(
        screen.contains("REQ/S") && screen.contains("P99 MS"),
        "{screen}"
    );
}
