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

/// A UDP echo server that appends every datagram it gets to `log`, one per line.
const ECHO_SERVER: &str = r#"
import socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
with open(log, "a") as f:
    f.write("ready\n"); f.flush()
    while True:
        data, peer = s.recvfrom(2048)
        f.write(data.decode(errors="replace") + "\n"); f.flush()
        s.sendto(data, peer)
"#;

/// Sends `payload` to `target:port` and prints the reply, or `no reply` after 1 s. With
/// `connected` the socket is connected to the target first, so the kernel matches the reply
/// to it before any sk_lookup program runs.
const EXCHANGE: &str = r#"
import socket, sys
target, port, payload, connected = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
if connected:
    s.connect((target, port)); s.send(payload.encode())
else:
    s.sendto(payload.encode(), (target, port))
try:
    print(s.recv(2048).decode())
except socket.timeout:
    print("no reply")
"#;

/// A DNS query for `example.test` from an unconnected socket (the answer comes back through
/// sk_lookup): prints the answer's address.
const DNS_QUERY: &str = r#"
import socket, struct, sys
query = struct.pack(">HHHHHH", 0x2a2a, 0x0100, 1, 0, 0, 0)
query += b"\x07example\x04test\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(query, (sys.argv[1], 53))
try:
    print(".".join(str(b) for b in s.recv(4096)[-4:]))
except socket.timeout:
    print("no reply")
"#;

fn python(tb: &Testbed, pod: &Pod, script: &str, args: &[&str]) -> String {
    let mut python = Command::new("python3");
    python.args(["-c", script]).args(args);
    let output = tb.run_in_pod(pod, python).expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
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
        let target = self.server.ipv4().to_string();
        let port = ECHO_PORT.to_string();
        python(
            &self.tb,
            &self.outsider,
            EXCHANGE,
            &[&target, &port, payload, "0"],
        )
    }

    /// Proves the server is alive and has read everything sent before: a datagram from its
    /// own loopback (never dropped) shows up in its log.
    fn sync(&self, marker: &str) {
        python(
            &self.tb,
            &self.server,
            EXCHANGE,
            &["127.0.0.1", &ECHO_PORT.to_string(), marker, "0"],
        );
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
    let mut echo = Command::new("python3");
    echo.args(["-c", ECHO_SERVER, &ECHO_PORT.to_string()])
        .arg(&echo_log);
    tb.spawn_in_pod(&server, echo).expect("echo").detach();
    let mut dnsmasq = Command::new("dnsmasq");
    let resolver = outsider.ipv4().to_string();
    dnsmasq.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
        &format!("--listen-address={resolver}"),
        &format!("--address=/example.test/{EXAMPLE}"),
    ]);
    tb.spawn_in_pod(&outsider, dnsmasq)
        .expect("dnsmasq")
        .detach();
    tb.wait_listening(&outsider, 53).expect("dnsmasq listening");
    let mut udp = Udp {
        tb,
        server,
        outsider,
        echo_log,
    };
    wait_until(scaled(Duration::from_secs(5)), "the echo server", || {
        Ok(std::fs::read_to_string(&udp.echo_log)
            .unwrap_or_default()
            .starts_with("ready"))
    })
    .unwrap_or_else(|e| panic!("{e}"));

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
    assert_eq!(
        python(&udp.tb, &udp.server, DNS_QUERY, &[&resolver]),
        EXAMPLE
    );
    let outsider_echo = udp.tb.log_dir().join("outsider-echo.log");
    let mut echo = Command::new("python3");
    echo.args(["-c", ECHO_SERVER, &ECHO_PORT.to_string()])
        .arg(&outsider_echo);
    udp.tb
        .spawn_in_pod(&udp.outsider, echo)
        .expect("outsider echo")
        .detach();
    wait_until(
        scaled(Duration::from_secs(5)),
        "the outsider's echo",
        || {
            Ok(std::fs::read_to_string(&outsider_echo)
                .unwrap_or_default()
                .starts_with("ready"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let port = ECHO_PORT.to_string();
    let exchange = |payload: &str, connected: &str| {
        python(
            &udp.tb,
            &udp.server,
            EXCHANGE,
            &[&resolver, &port, payload, connected],
        )
    };
    assert_eq!(exchange("connected", "1"), "connected");
    assert_eq!(exchange("unconnected", "0"), "no reply");
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
