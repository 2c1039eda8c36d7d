//! Inbound UDP to meshed pods: the mesh does not cover UDP, so a STRICT namespace can drop
//! it with `nodemesh.io/inbound-udp=deny`, in the kernel (the inbound sk_lookup program),
//! except the answers of DNS resolvers and datagrams to a socket connected to their source.
//! The attack first: a pod outside the mesh reaches a STRICT pod's UDP server; then the label
//! stops it, also with the agent dead, while the pod's own DNS keeps working. Needs root.

use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use nodemesh_testbed::{MESH_LABEL, Pod, Signal, Testbed, is_root, scaled, wait_until};

const PEER_AUTHENTICATION_LABEL: &str = "nodemesh.io/peer-authentication";
const INBOUND_UDP_LABEL: &str = "nodemesh.io/inbound-udp";
const ECHO_PORT: u16 = 7000;
/// What dnsmasq answers for `example.test`.
const EXAMPLE: &str = "192.0.2.7";

/// The workload's `mode` in `pod` with `args`: its output.
fn workload(tb: &Testbed, pod: &Pod, mode: &str, args: &[&str]) -> String {
    let mut command = Command::new(tb.workload_bin());
    command.arg(mode).args(args);
    let output = tb.run_in_pod(pod, command).expect("workload");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// One datagram from `pod` to `target`: the reply, or "no reply" after 1 s.
fn exchange(tb: &Testbed, pod: &Pod, target: &str, payload: &str, connected: bool) -> String {
    let mut args = vec!["--target", target, "--payload", payload];
    if connected {
        args.push("--connected");
    }
    workload(tb, pod, "udp-send", &args)
}

/// A UDP echo server in `pod` that appends every datagram it gets to `log`.
fn start_echo(tb: &Testbed, pod: &Pod, log: &std::path::Path) {
    let mut echo = Command::new(tb.workload_bin());
    echo.args(["udp-echo", "--port", &ECHO_PORT.to_string(), "--log"])
        .arg(log);
    tb.spawn_in_pod(pod, echo).expect("echo").detach();
    wait_until(scaled(Duration::from_secs(5)), "the echo server", || {
        Ok(std::fs::read_to_string(log)
            .unwrap_or_default()
            .starts_with("ready"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

struct Udp {
    tb: Testbed,
    server: Pod,
    outsider: Pod,
    echo_log: PathBuf,
}

impl Udp {
    /// What the server got, in order (after its "ready" line).
    fn server_got(&self) -> Vec<String> {
        std::fs::read_to_string(&self.echo_log)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .map(str::to_owned)
            .collect()
    }

    /// `payload` from the outsider to the server's echo port: its reply, or "no reply".
    fn outsider_sends(&self, payload: &str) -> String {
        let target = format!("{}:{ECHO_PORT}", self.server.ipv4());
        exchange(&self.tb, &self.outsider, &target, payload, false)
    }

    /// Proves the server is alive and has read everything sent before: a datagram from its
    /// own loopback (never dropped) shows up in its log.
    fn sync(&self, marker: &str) {
        let target = format!("127.0.0.1:{ECHO_PORT}");
        exchange(&self.tb, &self.server, &target, marker, false);
        wait_until(scaled(Duration::from_secs(5)), "the marker read", || {
            Ok(self.server_got().iter().any(|l| l == marker))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    fn set_labels(&mut self, udp: &str) {
        let labels = BTreeMap::from([
            (MESH_LABEL.to_owned(), "enabled".to_owned()),
            (PEER_AUTHENTICATION_LABEL.to_owned(), "strict".to_owned()),
            (INBOUND_UDP_LABEL.to_owned(), udp.to_owned()),
        ]);
        self.tb
            .set_namespace_labels("mesh", labels)
            .expect("relabel");
        let expected = udp.to_ascii_uppercase();
        wait_until(
            scaled(Duration::from_secs(5)),
            "inbound-udp applied",
            || {
                let dump = self.tb.admin_json("node2", "/config_dump")?;
                Ok(dump["enrolled_pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == "server-b" && p["inbound_udp"] == expected.as_str()))
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_strict_namespace_can_drop_inbound_udp_but_dns_answers() {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let (tb, _ca) = Testbed::create_meshed("nmudp", 3600).expect("meshed testbed");
    let server = tb.pod("mesh", "server-b").clone();
    let outsider = tb.pod("plain", "outsider").clone();
    let echo_log = tb.log_dir().join("udp-echo.log");
    start_echo(&tb, &server, &echo_log);
    let example = format!("--address=/example.test/{EXAMPLE}");
    let query_log = tb.log_dir().join("dnsmasq-queries.log");
    tb.start_dnsmasq(&outsider, &query_log, &[&example])
        .expect("dnsmasq");
    let mut udp = Udp {
        tb,
        server,
        outsider,
        echo_log,
    };

    // The attack: under STRICT alone, plaintext UDP from outside the mesh gets in.
    udp.set_labels("allow");
    assert_eq!(udp.outsider_sends("before"), "before");
    assert_eq!(udp.server_got(), ["before"]);

    // Denied: the datagram never reaches the server, which is alive and reads on.
    udp.set_labels("deny");
    assert_eq!(udp.outsider_sends("denied"), "no reply");
    udp.sync("marker-1");
    assert!(!udp.server_got().contains(&"denied".to_owned()));

    // The pod's own UDP: a DNS answer (from port 53) to an unconnected socket gets in, and
    // so does a reply to a connected socket; a reply from any other port to an unconnected
    // socket is inbound UDP like any other and dropped.
    let resolver = udp.outsider.ipv4().to_string();
    let asked = workload(
        &udp.tb,
        &udp.server,
        "dns-ask",
        &["--resolver", &resolver, "--name", "example.test"],
    );
    assert_eq!(asked, format!("{resolver} 53 {EXAMPLE}"));
    let outsider_echo = udp.tb.log_dir().join("outsider-echo.log");
    start_echo(&udp.tb, &udp.outsider, &outsider_echo);
    let target = format!("{resolver}:{ECHO_PORT}");
    let from_server = |payload: &str, connected: bool| {
        exchange(&udp.tb, &udp.server, &target, payload, connected)
    };
    assert_eq!(from_server("connected", true), "connected");
    assert_eq!(from_server("unconnected", false), "no reply");
    assert!(
        std::fs::read_to_string(&outsider_echo)
            .unwrap_or_default()
            .contains("unconnected"),
        "the request went out; only the reply was dropped"
    );

    // The kernel enforces it: with the agent dead, still denied.
    udp.tb.kill_agent("node2", Signal::SIGKILL).expect("kill");
    assert_eq!(udp.outsider_sends("agent-dead"), "no reply");
    udp.sync("marker-2");
    assert!(!udp.server_got().contains(&"agent-dead".to_owned()));
}
