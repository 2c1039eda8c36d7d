//! GRPCRoute on the testbed: docs/l7.md's `grpc` example, applied verbatim to the real API
//! server, routes tonic's calls (`grpc-client`) to tonic servers (`grpc-server`) by method
//! and header, adds a header, splits by weight, and gets its status written back; a version
//! nodemesh cannot honour is reported and the last good one keeps serving.

use super::*;

const GRPC: &str = "198.18.200.30";
const GRPC_A: &str = "198.18.200.31";
const GRPC_B: &str = "198.18.200.32";
const GRPC_PORT: u16 = 9000;

/// `grpc-client` from the client pod to the `grpc` Service; its JSON summary.
fn calls(tb: &Testbed, method: &str, count: usize, headers: &[&str]) -> Value {
    let target = format!("{GRPC}:{GRPC_PORT}");
    let count = count.to_string();
    let mut args = vec![
        "grpc-client",
        "--target",
        &target,
        "--method",
        method,
        "--calls",
        &count,
    ];
    for header in headers {
        args.extend(["--header", header]);
    }
    let (summary, ok) = workload(tb, &client(tb), &args);
    assert!(ok, "gRPC calls {args:?}: {summary}");
    summary
}

#[test]
fn grpc_routes_send_calls_by_method_and_header_with_weights_and_report_status() {
    let (tb, _ca) = setup("nml7g");
    let a = tb.pod("mesh", "server-a").clone();
    let b = tb.pod("mesh", "server-b").clone();
    let port = GRPC_PORT.to_string();
    for pod in [&a, &b] {
        let args = ["grpc-server", "--port", &port, "--name", pod.name()];
        tb.start_workload_server(pod, GRPC_PORT, &args)
            .expect("grpc-server listening");
    }
    apply_service_on(&tb, ("grpc", GRPC, GRPC_PORT), None, &[&a, &b], GRPC_PORT);
    apply_service_on(&tb, ("grpc-a", GRPC_A, GRPC_PORT), None, &[&a], GRPC_PORT);
    apply_service_on(&tb, ("grpc-b", GRPC_B, GRPC_PORT), None, &[&b], GRPC_PORT);
    wait_for_dump(&tb, "six Services", |dump| {
        Testbed::workload_services(dump).len() == 6
    });
    // Before the route, a canary call reaches the servers without the header the route
    // adds: what the route changes below is the route's doing.
    let before = calls(&tb, "Say", 4, &["x-canary=yes"]);
    assert_eq!(before["route_headers"][""], 4, "{before}");

    apply_example(&tb, "grpc");
    wait_for_dump(&tb, "the GRPCRoute loaded", |dump| {
        dump["routes"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["route"] == "GRPCRoute mesh/echo"))
    });
    wait_route_condition(&tb, "grpcroute/echo", "Accepted", "True Accepted");
    wait_route_condition(&tb, "grpcroute/echo", "ResolvedRefs", "True ResolvedRefs");

    // The exact method: every Shout to server-b, upper-cased by it.
    let shout = calls(&tb, "Shout", 20, &[]);
    assert_eq!(shout["servers"]["server-b"], 20, "{shout}");
    assert_eq!(shout["replies"]["Shout: HELLO GRPC"], 20, "{shout}");
    // The header match wins over the service and its filter sets x-route.
    let canary = calls(&tb, "Say", 10, &["x-canary=yes"]);
    assert_eq!(canary["servers"]["server-b"], 10, "{canary}");
    assert_eq!(canary["route_headers"]["canary"], 10, "{canary}");
    // The rest of the service, 3:1. Over 200 calls server-a gets no more than server-b
    // with probability below 1e-12, and server-b none with 0.75^200.
    let split = calls(&tb, "Say", 200, &[]);
    let served = |name: &str| split["servers"][name].as_u64().unwrap_or(0);
    assert!(
        served("server-a") > served("server-b") && served("server-b") > 0,
        "{split}"
    );
    assert_eq!(split["route_headers"][""], 200, "{split}");

    // A filter nodemesh cannot honour: reported, and the last good version keeps serving.
    let mut mirror = example("grpc");
    mirror["spec"]["rules"][0]["filters"] = serde_yaml::from_str(
        "[{type: RequestMirror, requestMirror: {backendRef: {name: grpc-a, port: 9000}}}]",
    )
    .expect("filter YAML");
    tb.apply_object("example-grpc.yaml", &mirror)
        .expect("route update");
    wait_route_condition(&tb, "grpcroute/echo", "Accepted", "False UnsupportedValue");
    let still = calls(&tb, "Shout", 5, &[]);
    assert_eq!(still["servers"]["server-b"], 5, "{still}");
    let log = tb.agent_log("node1");
    assert!(
        log.contains("GRPCRoute mesh/echo: spec.rules[0].filters[0].type"),
        "the agent logs the rejected field"
    );
}
