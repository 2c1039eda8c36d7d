//! Kernel tests of outbound capture: real eBPF programs on the running kernel, real agents,
//! pods as network namespaces with kubelet-style cgroups, real TCP programs as workloads.
//! Each test builds its own testbed (unique names) and tears it down, also on failure.
//! Needs root; CI runs them (`cargo xtask test`).

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use nodemesh_testbed::{
    AgentOptions, PodSpec, Signal, Testbed, TestbedConfig, TopologySpec, is_root, scaled,
    wait_until,
};
use serde_json::Value;

const ECHO_PORT: u16 = 7000;

fn testbed() -> Testbed {
    testbed_with(TopologySpec::standard())
}

fn testbed_with(topology: TopologySpec) -> Testbed {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace("nmt").unwrap_or_else(|e| panic!("{e}"));
    Testbed::create(config, topology).expect("create testbed")
}

fn start_agents(tb: &Testbed, options: &AgentOptions) {
    for node in ["node1", "node2"] {
        tb.start_agent(node, options).expect("start agent");
    }
}

fn workload(tb: &Testbed, args: &[&str]) -> Command {
    let mut command = Command::new(tb.workload_bin());
    command.args(args);
    command
}

/// Starts the echo server in `ns/name` on the given ports and waits until it listens.
fn echo_server(tb: &Testbed, ns: &str, name: &str, ports: &str, first_port: u16) {
    let command = workload(tb, &["echo-server", "--ports", ports]);
    let pod = tb.pod(ns, name).clone();
    tb.spawn_in_pod(&pod, command)
        .expect("spawn echo server")
        .detach();
    tb.wait_listening(&pod, first_port)
        .expect("echo server listening");
}

/// Runs a workload client in a pod; returns its JSON summary and whether it exited 0.
/// `echo-client` from the pod: `connections` connections each echoing `bytes` bytes.
fn echo(
    tb: &Testbed,
    ns: &str,
    name: &str,
    target: &str,
    bytes: usize,
    connections: usize,
) -> (Value, bool) {
    run_client(
        tb,
        ns,
        name,
        &[
            "echo-client",
            "--target",
            target,
            "--bytes",
            &bytes.to_string(),
            "--connections",
            &connections.to_string(),
        ],
    )
}

fn run_client(tb: &Testbed, ns: &str, name: &str, args: &[&str]) -> (Value, bool) {
    let pod = tb.pod(ns, name).clone();
    let output = tb.run_in_pod(&pod, workload(tb, args)).expect("run client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "client printed no JSON summary; stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    (summary, output.status.success())
}

/// Connection counters the node's proxy reports, keyed by (source pod, destination).
fn proxied(tb: &Testbed, node: &str) -> BTreeMap<(String, String), Value> {
    let stats = tb.admin_json(node, "/stats").expect("GET /stats");
    stats["connections"]
        .as_array()
        .expect("connections array")
        .iter()
        .map(|s| {
            (
                (
                    s["source_pod"].as_str().unwrap_or_default().to_owned(),
                    s["destination"].as_str().unwrap_or_default().to_owned(),
                ),
                s.clone(),
            )
        })
        .collect()
}

fn total_opened(tb: &Testbed, node: &str) -> u64 {
    proxied(tb, node)
        .values()
        .map(|s| s["opened"].as_u64().unwrap_or(0))
        .sum()
}

fn addr(ip: impl std::fmt::Display, port: u16) -> String {
    let ip = ip.to_string();
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Waits until the proxy has counted the closed connections (it counts after both directions
/// finish, which can be a moment after the client saw its echo).
fn wait_closed(tb: &Testbed, node: &str, source: &str, destination: &str, closed: u64) -> Value {
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(5),
        &format!("{source} -> {destination} closed {closed} on {node}"),
        || {
            last = proxied(tb, node)
                .get(&(source.to_owned(), destination.to_owned()))
                .cloned()
                .unwrap_or(Value::Null);
            Ok(last["closed"].as_u64() == Some(closed))
        },
    )
    .unwrap_or_else(|e| panic!("{e}; last seen: {last}"));
    last
}

#[test]
fn meshed_pod_traffic_across_nodes_goes_through_the_proxy_byte_exact() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);

    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 1048576, 4);
    assert!(ok, "echo through the mesh failed: {summary}");
    assert_eq!(summary["ok"], 4, "{summary}");

    let counters = wait_closed(&tb, "node1", "mesh/client-a", &target, 4);
    assert_eq!(counters["opened"], 4);
    assert_eq!(
        counters["bytes_sent"],
        4 * 1_048_576,
        "every byte sent went through node1's proxy"
    );
    assert_eq!(
        counters["bytes_received"],
        4 * 1_048_576,
        "every echoed byte came back through it"
    );
    assert_eq!(
        total_opened(&tb, "node2"),
        0,
        "the server side has no outbound connections to capture"
    );
}

#[test]
fn ipv6_is_captured_and_reports_the_dialled_peer() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv6(), ECHO_PORT);

    // echo-client fails if getpeername() differs from the target.
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 65536, 3);
    assert!(ok, "{summary}");
    assert_eq!(summary["peer_mismatch"], 0, "{summary}");
    let counters = wait_closed(&tb, "node1", "mesh/client-a", &target, 3);
    assert_eq!(counters["bytes_sent"], 3 * 65536);
}

#[test]
fn pods_outside_the_mesh_bypass_the_proxy() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);

    let (summary, ok) = echo(&tb, "plain", "outsider", &target, 4096, 3);
    assert!(ok, "{summary}");
    assert_eq!(
        total_opened(&tb, "node1"),
        0,
        "node1's proxy saw the outsider's connections: {:?}",
        proxied(&tb, "node1")
    );
    let dump = tb.admin_json("node1", "/config_dump").expect("config dump");
    let enrolled: Vec<&str> = dump["enrolled_pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(!enrolled.contains(&"outsider"), "{enrolled:?}");
    assert!(
        enrolled.contains(&"client-a") && enrolled.contains(&"server-a"),
        "{enrolled:?}"
    );
}

#[test]
fn the_proxys_own_connections_are_never_captured_again() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    // Destination is a meshed pod on the same node: the proxy's upstream socket lives in a
    // meshed pod's network namespace and goes to another meshed pod. A loop would show up as
    // more than one proxied connection per client connection, or as a failure.
    echo_server(&tb, "mesh", "server-a", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-a").ipv4(), ECHO_PORT);
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 1000, 1);
    assert!(ok, "{summary}");
    wait_closed(&tb, "node1", "mesh/client-a", &target, 1);
    assert_eq!(
        total_opened(&tb, "node1"),
        1,
        "exactly one proxied connection: {:?}",
        proxied(&tb, "node1")
    );
}

#[test]
fn a_pod_cannot_escape_capture_by_marking_its_sockets_as_the_proxys() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);
    let client = tb.pod("mesh", "client-a").clone();
    // The testbed's pods hold every capability, so SO_MARK (CAP_NET_ADMIN) is theirs to set:
    // the value is the agent's default --proxy-mark (0x4e4d0001).
    for mark in ["", ",setsockopt-int=1:36:1313669121"] {
        let mut socat = Command::new("sh");
        socat.args([
            "-c",
            &format!("printf ping | socat -t 2 - TCP:{target}{mark}"),
        ]);
        let output = tb.run_in_pod(&client, socat).expect("socat");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "ping",
            "{mark}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Both went through the proxy: the unmarked one (capture is active) and the marked one.
    wait_closed(&tb, "node1", "mesh/client-a", &target, 2);
}

#[test]
fn two_hundred_concurrent_connections_each_keep_their_original_destination() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7100-7119", 7100);
    let server_ip = tb.pod("mesh", "server-b").ipv4().to_string();
    for port in 7101..=7119 {
        let pod = tb.pod("mesh", "server-b").clone();
        tb.wait_listening(&pod, port).expect("listening");
    }

    let (summary, ok) = run_client(
        &tb,
        "mesh",
        "client-a",
        &[
            "connect-many",
            "--target-ip",
            &server_ip,
            "--ports",
            "7100-7119",
            "--connections",
            "200",
            "--bytes",
            "64",
        ],
    );
    assert!(ok, "{summary}");
    assert_eq!(summary["ok"], 200, "{summary}");
    assert_eq!(summary["peer_mismatch"], 0, "{summary}");
    for port in 7100..=7119 {
        let counters = wait_closed(&tb, "node1", "mesh/client-a", &addr(&server_ip, port), 10);
        assert_eq!(counters["opened"], 10, "port {port}: {counters}");
    }
}

#[test]
fn fail_open_lets_connections_through_after_the_agent_is_killed() {
    let tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);
    // With the agent running, client-a's connections are captured: node1's proxy carries them.
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 4096, 2);
    assert!(ok, "through the proxy: {summary}");
    let counters = wait_closed(&tb, "node1", "mesh/client-a", &target, 2);
    assert_eq!(counters["bytes_sent"], 2 * 4096, "{counters}");

    tb.kill_agent("node1", Signal::SIGKILL).expect("kill -9");
    let started = Instant::now();
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 4096, 2);
    assert!(
        ok,
        "fail-open must pass traffic through untouched: {summary}"
    );
    assert!(
        started.elapsed() < scaled(Duration::from_secs(5)),
        "no hang"
    );
}

#[test]
fn fail_closed_refuses_connections_at_once_after_the_agent_is_killed() {
    let tb = testbed();
    let options = AgentOptions {
        fail_mode: "closed".into(),
        ..Default::default()
    };
    start_agents(&tb, &options);
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 10, 1);
    assert!(
        ok,
        "with the agent running, fail-closed captures normally: {summary}"
    );

    tb.kill_agent("node1", Signal::SIGKILL).expect("kill -9");
    let started = Instant::now();
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 10, 1);
    assert!(!ok, "fail-closed must refuse: {summary}");
    assert!(
        summary.to_string().contains("Operation not permitted"),
        "refused by the hook with EPERM: {summary}"
    );
    assert!(
        started.elapsed() < scaled(Duration::from_secs(2)),
        "refused at once, took {:?}",
        started.elapsed()
    );

    // A pod outside the mesh is not affected by the fail mode.
    let (summary, ok) = echo(&tb, "plain", "outsider", &target, 10, 1);
    assert!(ok, "{summary}");

    // `nodemesh datapath remove` (what an uninstall runs) detaches everything: the meshed
    // pod connects directly again and no pin is left.
    let bpffs = tb.bpffs_dir("node1");
    let removed = std::process::Command::new(tb.nodemesh_bin())
        .args(["datapath", "remove", "--bpffs"])
        .arg(&bpffs)
        .output()
        .expect("nodemesh datapath remove");
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(!bpffs.exists(), "{} is gone", bpffs.display());
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 10, 1);
    assert!(ok, "no capture after datapath remove: {summary}");
}

#[test]
fn removing_the_namespace_label_unenrols_within_a_second() {
    let mut tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);
    let client = tb.pod("mesh", "client-a").clone();
    tb.wait_pod_enrolled(&client, true).expect("enrolled");

    tb.set_namespace_labels("mesh", BTreeMap::new())
        .expect("remove label");
    let started = Instant::now();
    wait_until(
        scaled(Duration::from_secs(1)),
        "client-a un-enrolled",
        || {
            let dump = tb.admin_json("node1", "/config_dump")?;
            Ok(!dump["enrolled_pods"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["uid"] == client.uid()))
        },
    )
    .expect("un-enrolled within 1 s of the label change");
    eprintln!(
        "un-enrolled {:?} after the label was removed",
        started.elapsed()
    );

    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 100, 2);
    assert!(ok, "{summary}");
    assert_eq!(
        total_opened(&tb, "node1"),
        0,
        "no longer proxied: {:?}",
        proxied(&tb, "node1")
    );
}

#[test]
fn a_pod_label_opts_one_pod_out_and_new_pods_are_enrolled() {
    let mut tb = testbed();
    start_agents(&tb, &AgentOptions::default());
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let target = addr(tb.pod("mesh", "server-b").ipv4(), ECHO_PORT);
    let client = tb.pod("mesh", "client-a").clone();

    tb.set_pod_labels(
        &client,
        [("nodemesh.io/mesh".to_owned(), "disabled".to_owned())].into(),
    )
    .expect("label pod");
    tb.wait_pod_enrolled(&client, false).expect("opted out");
    let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 100, 1);
    assert!(ok, "{summary}");
    assert_eq!(
        total_opened(&tb, "node1"),
        0,
        "opted-out pod bypasses: {:?}",
        proxied(&tb, "node1")
    );

    let newcomer = tb
        .add_pod(
            "node1",
            PodSpec::new("mesh", "newcomer").with_service_account("newcomer"),
        )
        .expect("add pod");
    tb.wait_pod_enrolled(&newcomer, true)
        .expect("new pod enrolled");
    let (summary, ok) = echo(&tb, "mesh", "newcomer", &target, 100, 1);
    assert!(ok, "{summary}");
    wait_closed(&tb, "node1", "mesh/newcomer", &target, 1);
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() {
    let tb = testbed();
    let server_b = tb.pod("mesh", "server-b").ipv4().to_string();
    let options = AgentOptions {
        extra_args: vec![
            "--exclude-port".into(),
            "7001".into(),
            "--exclude-cidr".into(),
            format!("{server_b}/32"),
        ],
        ..Default::default()
    };
    start_agents(&tb, &options);
    echo_server(&tb, "mesh", "server-a", "7000,7001", ECHO_PORT);
    echo_server(&tb, "mesh", "server-b", "7000", ECHO_PORT);
    let server_a = tb.pod("mesh", "server-a").ipv4().to_string();

    for target in [addr(&server_a, 7001), addr(&server_b, 7000)] {
        let (summary, ok) = echo(&tb, "mesh", "client-a", &target, 100, 1);
        assert!(ok, "{target}: {summary}");
    }
    assert_eq!(
        total_opened(&tb, "node1"),
        0,
        "excluded: {:?}",
        proxied(&tb, "node1")
    );
    let captured = addr(&server_a, 7000);
    let (summary, ok) = echo(&tb, "mesh", "client-a", &captured, 100, 1);
    assert!(ok, "{summary}");
    wait_closed(&tb, "node1", "mesh/client-a", &captured, 1);
}

#[test]
fn teardown_leaves_nothing_behind_even_when_a_test_fails() {
    let name;
    {
        let tb = testbed();
        start_agents(&tb, &AgentOptions::default());
        name = tb.name().to_owned();
        assert!(
            !nodemesh_testbed::leftovers(&name).is_empty(),
            "the testbed exists while it runs"
        );
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _owned = tb;
            panic!("a failing test");
        }));
        assert!(result.is_err());
    }
    let left = nodemesh_testbed::leftovers(&name);
    assert!(left.is_empty(), "left behind: {left:?}");
    // The panic kept the agent logs for reading; this panic was on purpose.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{name}-logs")));
}
