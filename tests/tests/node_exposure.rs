//! What the agent exposes to other processes on its node (hostNetwork pods, the node's own
//! root processes): the listener handoff socket and the admin and metrics ports
//! (docs/security.md, "Anything else on the node"). Each attack is first shown to reach
//! its target, then to be refused, while the agent serves on and a legitimate successor
//! still takes over. Real kernel, real agents, real processes with dropped capabilities.
//! Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    process::Command,
    time::Duration,
};

use nodemesh_testbed::{
    ADMIN_ADDR, AgentOptions, ClusterMode, Signal, Testbed, TestbedConfig, TopologySpec, is_root,
    wait_until,
};
use serde_json::Value;

const ECHO_PORT: u16 = 7000;
const METRICS_PORT: u16 = 15090;
/// The capabilities' bits in `/proc/<pid>/status` (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
/// What containerd and Docker give a container by default, CAP_SETFCAP among them (which
/// lets a root process map uid 0 into a user namespace of its own).
const RUNTIME_DEFAULT_CAPABILITIES: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,\
+setgid,+setuid,+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";

fn testbed(prefix: &str) -> Testbed {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace(prefix)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_cluster(ClusterMode::from_env_or(ClusterMode::Manifests));
    Testbed::create(config, TopologySpec::standard()).expect("create testbed")
}

/// `handoff-probe` on node1's handoff socket, run in the node's network namespace and a
/// cgroup that is not the agent's, behind `wrapper` (which drops capabilities, say).
fn probe_handoff(tb: &Testbed, wrapper: &[&str]) -> Value {
    let (program, rest) = wrapper.split_first().unwrap_or((&"env", &[]));
    let mut command = Command::new(program);
    command
        .args(rest)
        .arg(tb.workload_bin())
        .arg("handoff-probe")
        .arg("--socket")
        .arg(tb.handoff_socket("node1"));
    let output = tb
        .run_on_node("node1", command, Duration::from_secs(30))
        .expect("handoff-probe");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "handoff-probe printed no summary: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn capabilities(probe: &Value) -> u64 {
    u64::from_str_radix(probe["cap_eff"].as_str().unwrap_or_default(), 16).expect("CapEff")
}

/// client-a's echo to server-b; returns how many of client-a's connections node1's proxy
/// has carried to it and seen closed since the agent started.
fn echo_through_node1(tb: &Testbed, expected_closed: u64) {
    let client = tb.pod("mesh", "client-a").clone();
    let target = format!("{}:{ECHO_PORT}", tb.pod("mesh", "server-b").ipv4());
    let mut echo = Command::new(tb.workload_bin());
    echo.args(["echo-client", "--target", &target, "--bytes", "4096"]);
    let output = tb.run_in_pod(&client, echo).expect("echo client");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(5),
        "node1's proxy to count client-a's connections",
        || {
            let stats = tb.admin_json("node1", "/stats")?;
            last = stats["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["source_pod"] == "mesh/client-a" && s["destination"] == target)
                .cloned()
                .unwrap_or(Value::Null);
            Ok(last["closed"].as_u64() == Some(expected_closed))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {last}"));
}

/// Hands node1 to a successor as a surge upgrade does and waits for the old agent to exit.
fn hand_over_node1(tb: &Testbed, options: &AgentOptions) {
    tb.start_successor_agent("node1", options)
        .expect("a successor takes over");
    tb.signal_previous_agent("node1", Signal::SIGTERM)
        .expect("SIGTERM");
    let status = tb
        .wait_previous_agent("node1", Duration::from_secs(30))
        .expect("the previous agent exits");
    assert!(status.success(), "{status}");
}

#[test]
fn the_listener_handoff_refuses_root_processes_that_are_not_an_agent() {
    let tb = testbed("nmhand");
    for node in ["node1", "node2"] {
        tb.start_agent(node, &AgentOptions::default())
            .expect("agent");
    }
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_echo_server(&server, ECHO_PORT)
        .expect("echo server");
    echo_through_node1(&tb, 1);

    // The socket is a file in a directory that is the agent's: root's, mode 0700. Every
    // uid-0 process that mounts it passes those modes, whatever its capabilities.
    let socket = tb.handoff_socket("node1");
    let metadata = std::fs::metadata(&socket).expect("the handoff socket");
    assert!(metadata.file_type().is_socket());
    let directory = std::fs::metadata(socket.parent().expect("directory")).expect("directory");
    assert_eq!(
        (directory.uid(), directory.permissions().mode() & 0o777),
        (0, 0o700)
    );

    // Precondition: a root process with the agent's capabilities, in another cgroup than
    // the agent's, gets every pod's listening socket over it (and leaves without taking
    // over): the socket is reachable and the probe speaks the protocol.
    let agent_like = probe_handoff(&tb, &[]);
    eprintln!("as an agent: {agent_like}");
    assert_eq!(agent_like["outcome"], "listeners", "{agent_like}");
    let handed = agent_like["listeners"].as_u64().unwrap_or(0);
    assert!(
        handed >= 2 && agent_like["descriptors"] == handed,
        "{agent_like}"
    );
    tb.wait_agent_ready("node1", Duration::from_secs(10))
        .expect("the agent serves on after an abandoned handoff");

    // A hostNetwork container running as root with every capability dropped.
    let capless = probe_handoff(
        &tb,
        &["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"],
    );
    eprintln!("root without capabilities: {capless}");
    assert_eq!(
        (&capless["uid"], capabilities(&capless)),
        (&Value::from("0"), 0)
    );
    assert_eq!(capless["outcome"], "refused", "{capless}");
    assert_eq!(capless["descriptors"], 0, "{capless}");
    assert!(
        capless["reason"]
            .as_str()
            .is_some_and(|r| r.contains("CAP_BPF and CAP_SYS_ADMIN")),
        "{capless}"
    );

    // A root container with the runtime's default capabilities, in a user namespace of its
    // own where it maps uid 0 and holds every capability (CAP_BPF and CAP_SYS_ADMIN too).
    let namespaced = probe_handoff(
        &tb,
        &[
            "setpriv",
            "--inh-caps=-all",
            &format!("--bounding-set={RUNTIME_DEFAULT_CAPABILITIES}"),
            "--",
            "unshare",
            "--user",
            "--map-root-user",
            "--",
        ],
    );
    eprintln!("root in its own user namespace: {namespaced}");
    let agents = 1 << CAP_SYS_ADMIN | 1 << CAP_BPF;
    assert_eq!(namespaced["uid"], "0", "{namespaced}");
    assert_eq!(capabilities(&namespaced) & agents, agents, "{namespaced}");
    assert_eq!(namespaced["outcome"], "refused", "{namespaced}");
    assert_eq!(namespaced["descriptors"], 0, "{namespaced}");
    assert!(
        namespaced["reason"]
            .as_str()
            .is_some_and(|r| r.contains("another user namespace")),
        "{namespaced}"
    );

    // The agent said why in its log (it may write the line just after the probe saw the
    // refusal), and serves on as before.
    let refusals = |log: &str| {
        log.matches("refused a process that may not take the listeners over")
            .count()
    };
    let logged = wait_until(Duration::from_secs(10), "both refusals logged", || {
        Ok(refusals(&tb.agent_log("node1")) >= 2)
    });
    let log = tb.agent_log("node1");
    assert!(logged.is_ok(), "{log}");
    assert_eq!(refusals(&log), 2, "{log}");
    tb.wait_agent_ready("node1", Duration::from_secs(10))
        .expect("still ready");
    echo_through_node1(&tb, 2);

    // A real successor still takes over and serves.
    hand_over_node1(&tb, &AgentOptions::default());
    echo_through_node1(&tb, 1);
}

#[test]
fn no_other_process_can_share_the_agents_admin_and_metrics_ports() {
    let tb = testbed("nmports");
    let node_ip = IpAddr::from(tb.node("node1").expect("node1").ipv4());
    let metrics = SocketAddr::new(node_ip, METRICS_PORT);
    let options = AgentOptions {
        extra_args: vec!["--metrics-addr".to_owned(), metrics.to_string()],
        ..Default::default()
    };
    tb.start_agent("node1", &options).expect("agent");

    // Precondition: root processes of the node can share a port when both ask for
    // SO_REUSEPORT, which is what the agent's admin listener used to ask for: connections
    // to the port are then spread over both.
    let first = tb
        .try_bind_on_node("node1", "127.0.0.1:0".parse().unwrap(), true)
        .expect("in the node")
        .expect("a port");
    let shared = first.local_addr().expect("its address");
    let second = tb
        .try_bind_on_node("node1", shared, true)
        .expect("in the node");
    assert!(second.is_ok(), "SO_REUSEPORT shares a port: {second:?}");

    for port in [ADMIN_ADDR, metrics] {
        for reuse_port in [true, false] {
            let attempt = tb
                .try_bind_on_node("node1", port, reuse_port)
                .expect("in the node");
            assert!(
                attempt
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse),
                "{port} (SO_REUSEPORT {reuse_port}) is the agent's alone: {attempt:?}"
            );
        }
    }
    // /metrics answers on the node's address only, not on its other addresses.
    let (status, _) = tb
        .get_on_node("node1", metrics, "/metrics")
        .expect("metrics");
    assert_eq!(status, 200);
    let loopback = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    assert!(tb.get_on_node("node1", loopback, "/metrics").is_err());

    // The ports pass to a successor at the takeover, and are then its alone.
    hand_over_node1(&tb, &options);
    let (status, body) = tb.admin_get("node1", "/readyz").expect("readyz");
    assert_eq!(
        (status, body.trim().to_owned()),
        (
            200,
            format!("ready pid={}", tb.agent_pid("node1").expect("pid"))
        )
    );
    for port in [ADMIN_ADDR, metrics] {
        let attempt = tb
            .try_bind_on_node("node1", port, true)
            .expect("in the node");
        assert!(attempt.is_err(), "{port}: {attempt:?}");
    }
    let (status, _) = tb
        .get_on_node("node1", metrics, "/metrics")
        .expect("metrics");
    assert_eq!(status, 200);
}
