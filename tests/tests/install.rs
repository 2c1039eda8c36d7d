//! Installing and uninstalling with real Helm on a real API server: every testbed in API
//! server mode is `helm install`ed (tests/src/api_cluster.rs); here with the chart's
//! NetworkPolicies on (the API server accepts them; no network plugin runs here to enforce
//! them), and `helm uninstall` ends the mesh. A stop while the chart is installed (a restart, an upgrade) keeps capture on
//! purpose, so the fail mode holds; a stop once the DaemonSet is gone removes everything the
//! agent put on the node (docs/install.md). Needs root.

use std::process::Command;

use nodemesh_testbed::{AgentOptions, Pod, Signal, Testbed, TestbedConfig, TopologySpec, is_root};
use serde_json::Value;

const ECHO_PORT: u16 = 7000;

/// An echo from client-a to server-b; returns (summary, whether every byte came back).
fn echo(tb: &Testbed) -> (Value, bool) {
    let client = tb.pod("mesh", "client-a").clone();
    let target = format!("{}:{ECHO_PORT}", tb.pod("mesh", "server-b").ipv4());
    let mut command = Command::new(tb.workload_bin());
    command.args(["echo-client", "--target", &target, "--bytes", "64"]);
    let output = tb.run_in_pod(&client, command).expect("echo client");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (
        summary.clone(),
        output.status.success() && summary["ok"] == 1,
    )
}

/// Whether the pod has the policy routing the agent sets up at enrolment.
fn has_policy_routing(pod: &Pod) -> bool {
    let rules = Command::new("ip")
        .args(["netns", "exec", pod.netns(), "ip", "rule", "show"])
        .output()
        .expect("ip rule");
    String::from_utf8_lossy(&rules.stdout).contains("lookup 20045")
}

fn pins(tb: &Testbed, node: &str) -> usize {
    std::fs::read_dir(tb.bpffs_dir(node)).map_or(0, |entries| entries.count())
}

#[test]
fn helm_uninstall_then_a_stop_removes_the_mesh_from_the_node_while_a_restart_keeps_it() {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let values = tempfile::tempdir().expect("tempdir");
    let network_policies = values.path().join("network-policies.yaml");
    std::fs::write(
        &network_policies,
        "networkPolicy: {enabled: true, ca: {nodeCIDRs: [198.18.0.0/24]}}\n",
    )
    .expect("values");
    let mut config = TestbedConfig::from_workspace("nmuni").expect("config");
    config.chart_values = vec![network_policies];
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    let installed = tb
        .api()
        .expect("a real API server")
        .kubectl_ok(&[
            "-n",
            "nodemesh-system",
            "get",
            "networkpolicies",
            "-o",
            "name",
        ])
        .expect("kubectl get");
    assert_eq!(
        installed.lines().collect::<Vec<_>>(),
        [
            "networkpolicy.networking.k8s.io/nodemesh-agent-metrics",
            "networkpolicy.networking.k8s.io/nodemesh-ca"
        ]
    );
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 3600).expect("CA");
    let closed = AgentOptions {
        fail_mode: "closed".into(),
        extra_args: ca.agent_args("node1"),
        ..Default::default()
    };
    tb.start_agent("node1", &closed).expect("agent");
    let node2 = AgentOptions {
        extra_args: ca.agent_args("node2"),
        ..Default::default()
    };
    tb.start_agent("node2", &node2).expect("agent");
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_echo_server(&server, ECHO_PORT)
        .expect("echo server");
    let client = tb.pod("mesh", "client-a").clone();
    tb.wait_pod_enrolled(&client, true).expect("enrolled");
    assert!(has_policy_routing(&client), "set up at enrolment");
    let (summary, ok) = echo(&tb);
    assert!(ok, "through the mesh: {summary}");
    let stats = tb.admin_json("node1", "/stats").expect("stats");
    assert!(
        stats
            .to_string()
            .contains(&format!("{}:{ECHO_PORT}", server.ipv4())),
        "node1's proxy carried it: {stats}"
    );

    // A stop while the chart is installed keeps capture: with --fail-mode closed the
    // meshed pod's connections are refused until an agent serves again.
    let status = tb.kill_agent("node1", Signal::SIGTERM).expect("stop");
    assert!(status.success(), "{status}");
    assert!(pins(&tb, "node1") > 0, "pins kept for the next agent");
    let (summary, ok) = echo(&tb);
    assert!(!ok, "fail closed while no agent runs: {summary}");
    assert!(
        summary.to_string().contains("Operation not permitted"),
        "{summary}"
    );

    // helm uninstall, then the stop the kubelet would make when the agent pod goes.
    tb.start_agent("node1", &closed).expect("agent again");
    tb.api().unwrap().uninstall().expect("helm uninstall");
    let status = tb.kill_agent("node1", Signal::SIGTERM).expect("stop");
    assert!(status.success(), "{status}");
    let log = tb.agent_log("node1");
    assert!(
        log.contains("uninstall"),
        "the agent says it saw an uninstall:\n{log}"
    );
    assert_eq!(
        pins(&tb, "node1"),
        0,
        "no pin left in {}",
        tb.bpffs_dir("node1").display()
    );
    assert!(
        !has_policy_routing(&client),
        "nothing of the mesh stays in the pod"
    );
    let (summary, ok) = echo(&tb);
    assert!(ok, "the pod connects directly, not refused: {summary}");
}
