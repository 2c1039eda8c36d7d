//! The L7 proxy on the testbed, with real clients in meshed pods: curl (HTTP/1.1 and HTTP/2
//! prior knowledge), h2load, a gRPC call, a WebSocket echo, raw bytes through socat. The
//! HTTPRoutes applied are the examples in docs/l7.md, read from it verbatim. Needs root.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use nodemesh_testbed::{
    MeshCa, Pod, Testbed, TestbedConfig, TopologySpec, cluster_state, is_root, wait_until,
};
use serde_json::Value;

const WEB: &str = "198.18.200.20";
const WEB_A: &str = "198.18.200.21";
const WEB_B: &str = "198.18.200.22";
const APP_PORT: u16 = 8080;

/// The example `name` of docs/l7.md.
fn example(name: &str) -> serde_yaml::Value {
    nodemesh_testbed::docs::example("l7.md", name).unwrap_or_else(|e| panic!("{e}"))
}

/// A meshed testbed with HTTP servers on server-a (node1) and server-b (node2), and three
/// Services: `web` (both), `web-a` and `web-b` (one each), port 80 → 8080.
fn setup(prefix: &str) -> (Testbed, MeshCa) {
    setup_with(prefix, GatewayApi::Standard)
}

/// Which channel of the Gateway API CRDs the cluster has.
#[derive(PartialEq)]
enum GatewayApi {
    Standard,
    /// With the experimental channel's HTTPRoute (`retry`), installed before the agents
    /// start, as a cluster that chose that channel has it.
    Experimental,
}

fn setup_with(prefix: &str, gateway_api: GatewayApi) -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace(prefix).expect("config");
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    if gateway_api == GatewayApi::Experimental {
        tb.api()
            .expect("a real API server")
            .install_experimental_http_routes()
            .expect("experimental HTTPRoute CRD");
    }
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 3600).expect("CA");
    tb.start_agents_with_ca(&ca).expect("agents");
    let a = tb.pod("mesh", "server-a").clone();
    let b = tb.pod("mesh", "server-b").clone();
    for pod in [&a, &b] {
        tb.start_http_server(pod, APP_PORT).expect("http server");
    }
    apply_service(&tb, "web", WEB, None, &[&a, &b], APP_PORT);
    apply_service(&tb, "web-a", WEB_A, None, &[&a], APP_PORT);
    apply_service(&tb, "web-b", WEB_B, None, &[&b], APP_PORT);
    wait_for_dump(&tb, "three Services", |dump| {
        Testbed::workload_services(dump).len() == 3
    });
    (tb, ca)
}

fn apply_service(
    tb: &Testbed,
    name: &str,
    ip: &str,
    app_protocol: Option<&str>,
    endpoints: &[&Pod],
    target: u16,
) {
    apply_service_on(tb, (name, ip, 80), app_protocol, endpoints, target);
}

/// `apply_service` with the Service's port: `(name, cluster IP, port)`.
fn apply_service_on(
    tb: &Testbed,
    (name, ip, port): (&str, &str, u16),
    app_protocol: Option<&str>,
    endpoints: &[&Pod],
    target: u16,
) {
    let mut service = cluster_state::service_object("mesh", name, ip, port, "http");
    if let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        ports[0].app_protocol = app_protocol.map(str::to_owned);
    }
    tb.apply_object(&format!("service-{name}.yaml"), &service)
        .expect("service");
    let endpoints: Vec<(&Pod, bool)> = endpoints.iter().map(|p| (*p, false)).collect();
    let slice = cluster_state::endpoint_slice_object(name, "http", target, &endpoints);
    tb.apply_object(&format!("endpointslice-{name}.yaml"), &slice)
        .expect("endpoint slice");
}

fn apply_example(tb: &Testbed, name: &str) {
    tb.apply_object(&format!("example-{name}.yaml"), &example(name))
        .expect("route");
}

/// Waits until node1's config dump satisfies `done`.
fn wait_for_dump(tb: &Testbed, what: &str, done: impl Fn(&Value) -> bool) {
    let mut last = Value::Null;
    wait_until(Duration::from_secs(10), what, || {
        last = tb.admin_json("node1", "/config_dump")?;
        Ok(done(&last))
    })
    .unwrap_or_else(|e| panic!("{e}; the last config dump: {last:#}"));
}

/// A condition of the status nodemesh wrote on the route `mesh/<route>` (an HTTPRoute's
/// name, or `grpcroute/<name>`), read back with kubectl: `status reason`.
fn route_condition(tb: &Testbed, route: &str, kind: &str) -> String {
    let path = format!(
        r#"jsonpath={{.status.parents[?(@.controllerName=="nodemesh.io/mesh")].conditions[?(@.type=="{kind}")]['status','reason']}}"#
    );
    let object = if route.contains('/') {
        route.to_owned()
    } else {
        format!("httproute/{route}")
    };
    tb.api()
        .expect("a real API server")
        .kubectl_ok(&["-n", "mesh", "get", &object, "-o", &path])
        .expect("kubectl get the route")
}

/// Waits until `route`'s status, as kubectl shows it, has condition `kind` as `expected`.
fn wait_route_condition(tb: &Testbed, route: &str, kind: &str, expected: &str) {
    let mut last = String::new();
    wait_until(Duration::from_secs(10), &format!("{route} {kind}"), || {
        last = route_condition(tb, route, kind);
        Ok(last == expected)
    })
    .unwrap_or_else(|e| panic!("{e}: status {last:?}"));
}

fn routes_loaded(tb: &Testbed, routes: usize) {
    wait_for_dump(tb, "routes loaded", |dump| {
        dump["routes"].as_array().map(Vec::len) == Some(routes)
    });
}

fn client(tb: &Testbed) -> Pod {
    tb.pod("mesh", "client-a").clone()
}

fn run(tb: &Testbed, pod: &Pod, program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    tb.run_in_pod(pod, command).expect("run in pod")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs nodemesh-workload in `pod`; returns its JSON summary and whether it succeeded.
fn workload(tb: &Testbed, pod: &Pod, args: &[&str]) -> (Value, bool) {
    let output = run(tb, pod, &tb.workload_bin().display().to_string(), args);
    let text = stdout(&output);
    let last = text.lines().last().unwrap_or("null");
    let summary = serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "workload {args:?}: no JSON summary; stdout {text:?} stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (summary, output.status.success())
}

/// `curl -s` with `args`; returns (status code, body).
fn curl(tb: &Testbed, pod: &Pod, args: &[&str]) -> (u16, String) {
    let mut all = vec!["-s", "--max-time", "10", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let text = stdout(&run(tb, pod, "curl", &all));
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[test]
fn http1_http2_grpc_and_websocket_cross_the_mesh() {
    let (tb, _ca) = setup("nml7p");
    let client = client(&tb);

    let (code, body) = curl(&tb, &client, &[&format!("http://{WEB}/echo/h1")]);
    assert_eq!(code, 200, "{body}");
    let seen = json(&body);
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(
        seen["headers"]["host"][0], WEB,
        "the client's Host arrives unchanged"
    );

    let (code, body) = curl(
        &tb,
        &client,
        &["--http2-prior-knowledge", &format!("http://{WEB}/echo/h2")],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "HTTP/2 end to end");

    // h2load: 400 requests on 2 connections, 10 streams each at a time.
    let output = run(
        &tb,
        &client,
        "h2load",
        &[
            "-n",
            "400",
            "-c",
            "2",
            "-m",
            "10",
            &format!("http://{WEB}/"),
        ],
    );
    let report = stdout(&output);
    assert!(
        report.contains("400 succeeded, 0 failed, 0 errored"),
        "h2load: {report}"
    );

    // tonic's client against the tonic service in the http-server: its status arrives in
    // the trailers, so a call that succeeds saw them cross the proxy.
    let target = format!("{WEB}:80");
    let (summary, ok) = workload(
        &tb,
        &client,
        &["grpc-client", "--target", &target, "--calls", "3"],
    );
    assert!(ok, "gRPC: {summary}");
    assert_eq!(summary["replies"]["Say: hello grpc"], 3, "{summary}");

    let (summary, ok) = workload(
        &tb,
        &client,
        &[
            "ws-echo",
            "--url",
            &format!("ws://{WEB}:80/ws"),
            "--messages",
            "5",
        ],
    );
    assert!(ok, "WebSocket: {summary}");
    assert_eq!(summary["echoed"], 5);

    // Every one of those was HTTP to the proxy, and went over HBONE to the servers.
    let stats = tb.admin_json("node1", "/stats").expect("stats");
    let detection = &stats["protocol_detection"];
    assert!(detection["http1"].as_u64().unwrap_or(0) >= 2, "{detection}");
    assert!(detection["http2"].as_u64().unwrap_or(0) >= 3, "{detection}");
}

#[test]
fn routes_split_match_rewrite_redirect_time_out_and_retry() {
    // `retry` is in Gateway API's experimental channel only (docs/l7.md).
    let (tb, _ca) = setup_with("nml7r", GatewayApi::Experimental);
    let client = client(&tb);
    apply_example(&tb, "split");
    apply_example(&tb, "paths");
    apply_example(&tb, "resilience");
    routes_loaded(&tb, 3);
    // The agents report each route's status to the API server, as kubectl shows it.
    for route in ["web-split", "web-paths", "web-resilience"] {
        wait_route_condition(&tb, route, "Accepted", "True Accepted");
        wait_route_condition(&tb, route, "ResolvedRefs", "True ResolvedRefs");
    }

    // Weighted split: 80/20 over 2,000 requests on one keep-alive connection.
    let (summary, ok) = workload(
        &tb,
        &client,
        &[
            "http-get",
            "--target",
            &format!("{WEB}:80"),
            "--count",
            "2000",
        ],
    );
    assert!(ok, "{summary}");
    let to_a = summary["servers"]["server-a"].as_u64().unwrap_or(0) as f64;
    let to_b = summary["servers"]["server-b"].as_u64().unwrap_or(0) as f64;
    assert_eq!(to_a + to_b, 2000.0, "{summary}");
    let share_a = to_a / 2000.0;
    assert!(
        (share_a - 0.8).abs() <= 0.05,
        "80/20 split within ±5%: {summary}"
    );

    // Header match: x-version: b goes to web-b.
    for _ in 0..5 {
        let (code, body) = curl(
            &tb,
            &client,
            &["-H", "x-version: b", &format!("http://{WEB}/echo/x")],
        );
        assert_eq!(code, 200);
        assert_eq!(json(&body)["server"], "server-b");
    }

    // Path prefix with rewrite and header filters: /api/v1 → server-a's /echo/v1.
    let (code, body) = curl(
        &tb,
        &client,
        &[
            "-D",
            "/dev/stderr",
            "-H",
            "x-secret: hunter2",
            &format!("http://{WEB}/api/v1?q=1"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    let seen = json(&body);
    assert_eq!(seen["server"], "server-a");
    assert_eq!(seen["path"], "/echo/v1");
    assert_eq!(seen["query"], "q=1");
    assert_eq!(seen["headers"]["x-mesh"][0], "nodemesh");
    assert!(seen["headers"]["x-secret"].is_null(), "removed: {seen}");
    let mut head = Command::new("curl");
    head.args([
        "-s",
        "-o",
        "/dev/null",
        "-D",
        "-",
        &format!("http://{WEB}/api/v1"),
    ]);
    let headers = stdout(&tb.run_in_pod(&client, head).expect("curl"));
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("x-route: web-paths/api"),
        "{headers}"
    );

    // Redirect.
    let mut redirect = Command::new("curl");
    redirect.args([
        "-s",
        "-o",
        "/dev/null",
        "-D",
        "-",
        &format!("http://{WEB}/old?x=1"),
    ]);
    let headers = stdout(&tb.run_in_pod(&client, redirect).expect("curl"));
    assert!(headers.starts_with("HTTP/1.1 301"), "{headers}");
    assert!(
        headers.contains(&format!("location: http://{WEB}/new?x=1")),
        "{headers}"
    );

    // Timeout: a 5 s response is cut at 300 ms with 504.
    let started = Instant::now();
    let (code, body) = curl(&tb, &client, &[&format!("http://{WEB}/delay/5000")]);
    let took = started.elapsed();
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("upstream request timeout"), "{body}");
    assert!(took < Duration::from_secs(3), "504 after {took:?}");

    // Retry: the first attempt of each key gets 503, the retry succeeds.
    for key in ["k1", "k2", "k3"] {
        let (code, body) = curl(&tb, &client, &[&format!("http://{WEB}/flaky/{key}")]);
        assert_eq!(code, 200, "{key}: {body}");
    }
    // Without the route's retry the same injected failure reaches the client.
    let (code, _) = curl(&tb, &client, &[&format!("http://{WEB_A}/flaky/direct")]);
    assert_eq!(code, 503);

    // An invalid route is reported with its field; its last good version keeps serving.
    let mut broken = example("paths");
    broken["spec"]["rules"][0]["matches"][0]["path"] =
        serde_yaml::from_str("{type: RegularExpression, value: '(('}").unwrap();
    tb.apply_object("example-paths.yaml", &broken)
        .expect("route");
    wait_for_dump(&tb, "route error reported", |dump| {
        dump["config_errors"].as_array().is_some_and(|errors| {
            errors.iter().any(|e| {
                e.as_str().is_some_and(|e| {
                    e.starts_with(
                        "HTTPRoute mesh/web-paths: spec.rules[0].matches[0].path.value: invalid regular expression",
                    )
                })
            })
        })
    });
    wait_route_condition(&tb, "web-paths", "Accepted", "False UnsupportedValue");
    let (code, body) = curl(
        &tb,
        &client,
        &["-H", "x-version: b", &format!("http://{WEB}/echo/x")],
    );
    assert_eq!(
        (code, json(&body)["server"].clone()),
        (200, "server-b".into())
    );
}

#[test]
fn outlier_ejection_stops_sending_to_a_failing_endpoint() {
    let (tb, _ca) = setup("nml7o");
    let client = client(&tb);
    let a = tb.pod("mesh", "server-a").clone();
    let b = tb.pod("mesh", "server-b").clone();
    // Port 9090: server-a fails every request with 500 at once, server-b answers after 200 ms
    // (far above what even a first request over a new HBONE connection costs on a loaded
    // machine). Latency-based choice prefers the fast failing endpoint: exactly the case
    // outlier ejection exists for.
    let mut bad = Command::new(tb.workload_bin());
    bad.args([
        "http-server",
        "--port",
        "9090",
        "--name",
        "server-a",
        "--fail-status",
        "500",
    ]);
    tb.spawn_in_pod(&a, bad).expect("server").detach();
    let mut good = Command::new(tb.workload_bin());
    good.args([
        "http-server",
        "--port",
        "9090",
        "--name",
        "server-b",
        "--delay-ms",
        "200",
    ]);
    tb.spawn_in_pod(&b, good).expect("server").detach();
    tb.wait_listening(&a, 9090).expect("listening");
    tb.wait_listening(&b, 9090).expect("listening");
    const UNSTABLE: &str = "198.18.200.23";
    apply_service(&tb, "unstable", UNSTABLE, None, &[&a, &b], 9090);
    wait_for_dump(&tb, "four Services", |dump| {
        Testbed::workload_services(dump).len() == 4
    });

    let (summary, _) = workload(
        &tb,
        &client,
        &[
            "http-get",
            "--target",
            &format!("{UNSTABLE}:80"),
            "--count",
            "30",
        ],
    );
    // Five consecutive failures eject server-a (for 10 s, longer than the 25 requests left
    // take at 200 ms); everything after goes to server-b.
    assert_eq!(summary["statuses"]["500"], 5, "{summary}");
    assert_eq!(summary["statuses"]["200"], 25, "{summary}");
    let dump = tb.admin_json("node1", "/config_dump").expect("dump");
    let a_endpoint = format!("{}:9090", a.ipv4());
    let ejected = dump["http_endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["endpoint"] == a_endpoint.as_str())
        .map(|e| e["ejected"].clone());
    assert_eq!(
        ejected,
        Some(Value::Bool(true)),
        "{}",
        dump["http_endpoints"]
    );
}

#[test]
fn server_first_protocols_never_stall_and_app_protocol_or_an_opaque_port_skips_detection() {
    let (tb, _ca) = setup("nml7s");
    let client = client(&tb);
    let b = tb.pod("mesh", "server-b").clone();
    let mut banner = Command::new(tb.workload_bin());
    banner.args(["banner-server", "--port", "2525"]);
    tb.spawn_in_pod(&b, banner).expect("banner server").detach();
    tb.wait_listening(&b, 2525).expect("listening");
    const DETECTED: &str = "198.18.200.24";
    const DECLARED: &str = "198.18.200.25";
    // MySQL's port, one of the default --opaque-ports: relayed without detection.
    const OPAQUE_PORT: &str = "198.18.200.26";
    apply_service(&tb, "smtp", DETECTED, None, &[&b], 2525);
    apply_service(&tb, "smtp-tcp", DECLARED, Some("tcp"), &[&b], 2525);
    apply_service_on(&tb, ("mysql", OPAQUE_PORT, 3306), None, &[&b], 2525);
    wait_for_dump(&tb, "six Services", |dump| {
        Testbed::workload_services(dump).len() == 6
    });

    let before = tb.admin_json("node1", "/stats").expect("stats")["protocol_detection"].clone();
    let mut worst: f64 = 0.0;
    for _ in 0..5 {
        let (summary, ok) = workload(
            &tb,
            &client,
            &[
                "read-banner",
                "--target",
                &format!("{DETECTED}:80"),
                "--timeout-ms",
                "5000",
            ],
        );
        assert!(ok, "{summary}");
        worst = worst.max(summary["banner_ms"].as_f64().unwrap_or(f64::MAX));
    }
    eprintln!("server-first banner through detection: worst {worst:.1} ms");
    // The bounded wait (100 ms) plus an HBONE connection, far from Linkerd's 10 s.
    assert!(worst < 1000.0, "banner after {worst} ms");
    for target in [format!("{DECLARED}:80"), format!("{OPAQUE_PORT}:3306")] {
        let (summary, ok) = workload(&tb, &client, &["read-banner", "--target", &target]);
        assert!(ok, "{target}: {summary}");
    }

    let after = tb.admin_json("node1", "/stats").expect("stats")["protocol_detection"].clone();
    let delta =
        |field: &str| after[field].as_u64().unwrap_or(0) - before[field].as_u64().unwrap_or(0);
    assert_eq!(delta("timed_out"), 5, "{after}");
    assert_eq!(
        delta("skipped"),
        2,
        "appProtocol: tcp and an opaque port skip detection: {after}"
    );
}

#[test]
fn smuggling_and_malformed_requests_never_reach_the_application() {
    let (tb, _ca) = setup("nml7m");
    let client = client(&tb);
    let raw = |request: String| -> String {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            &format!("printf '%s' \"$REQUEST\" | socat -t 2 - TCP:{WEB}:80"),
        ]);
        sh.env("REQUEST", request);
        stdout(&tb.run_in_pod(&client, sh).expect("socat"))
    };
    let status_line = |response: &str| response.lines().next().unwrap_or("").to_owned();

    // Content-Length and Transfer-Encoding together: framed by Transfer-Encoding (RFC 9112
    // §6.3), re-framed towards the application, and the client connection closed after the
    // response, so the bytes after the chunked body are never read as a request.
    let both = raw(
        "POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"
            .into(),
    );
    assert_eq!(
        both.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {both}"
    );
    assert!(
        both.to_ascii_lowercase().contains("connection: close"),
        "{both}"
    );
    assert!(!both.contains("/smuggled"), "{both}");
    let seen = json(both.split("\r\n\r\n").nth(1).unwrap_or(""));
    assert!(
        seen["headers"]["content-length"].is_null(),
        "the ambiguous length is dropped: {seen}"
    );

    let folded = raw("GET /echo HTTP/1.1\r\nHost: web\r\nX-A: a\r\n  folded\r\n\r\n".into());
    assert!(
        status_line(&folded).starts_with("HTTP/1.1 400"),
        "obs-fold: {folded}"
    );

    let huge = raw(format!(
        "GET /echo HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    ));
    assert!(
        status_line(&huge).starts_with("HTTP/1.1 431"),
        "oversized head: {}",
        status_line(&huge)
    );

    let bad_header = raw("GET /echo HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n".into());
    assert!(
        status_line(&bad_header).starts_with("HTTP/1.1 400"),
        "{bad_header}"
    );

    // A good request on the same path still works.
    let good = raw("GET /echo HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n".into());
    assert!(status_line(&good).starts_with("HTTP/1.1 200"), "{good}");
}

mod authorization;
mod grpc_route;
mod same_node;
mod zones;
mod zones_connections;
