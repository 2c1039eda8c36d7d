//! Plaintext arriving at meshed pods from outside the mesh, on the testbed with real clients:
//! the inbound sk_lookup program hands it to the node proxy, which follows the namespace's
//! peer authentication (PERMISSIVE delivers and counts, STRICT resets; the node's own
//! addresses, i.e. kubelet probes, always pass), and a dead agent leaves a STRICT pod
//! closed. Needs root.

use std::{collections::BTreeMap, net::IpAddr, process::Command, time::Duration};

use nodemesh_testbed::{
    AgentOptions, MESH_LABEL, MeshCa, Pod, Signal, Testbed, is_root, wait_until,
};
use serde_json::Value;

const PEER_AUTHENTICATION_LABEL: &str = "nodemesh.io/peer-authentication";
const APP_PORT: u16 = 8080;

struct Mesh {
    tb: Testbed,
    ca: MeshCa,
}

/// The meshed testbed with an HTTP server on mesh/server-b (node2).
fn meshed_testbed() -> Mesh {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let (tb, ca) = Testbed::create_meshed("nmin", 3600).expect("meshed testbed");
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_http_server(&server, APP_PORT)
        .expect("http server");
    Mesh { tb, ca }
}

/// curl's HTTP status for `url` from `pod` ("000" when no response), within 5 s.
fn curl_from_pod(tb: &Testbed, pod: &Pod, url: &str) -> String {
    let mut curl = Command::new("curl");
    curl.args(curl_args(url));
    let output = tb.run_in_pod(pod, curl).expect("run curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The same from the node's own network namespace, as the kubelet probes a pod.
fn curl_from_node(tb: &Testbed, node: &str, url: &str) -> String {
    let netns = tb.node(node).expect("node").netns().to_owned();
    let output = Command::new("ip")
        .args(["netns", "exec", &netns, "curl"])
        .args(curl_args(url))
        .output()
        .expect("curl in the node's netns");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn curl_args(url: &str) -> Vec<String> {
    [
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--connect-timeout",
        "2",
        "--max-time",
        "5",
        url,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn plaintext_counters(tb: &Testbed, node: &str) -> (u64, u64) {
    let stats = tb.admin_json(node, "/stats").expect("stats");
    let counters = &stats["inbound_plaintext"];
    (
        counters["permitted"].as_u64().expect("permitted"),
        counters["refused"].as_u64().expect("refused"),
    )
}

fn set_peer_authentication(mesh: &mut Mesh, mode: &str) {
    let labels = BTreeMap::from([
        (MESH_LABEL.to_owned(), "enabled".to_owned()),
        (PEER_AUTHENTICATION_LABEL.to_owned(), mode.to_owned()),
    ]);
    mesh.tb
        .set_namespace_labels("mesh", labels)
        .expect("relabel namespace");
}

/// Waits until node2's agent reports `expected` for mesh/server-b.
fn wait_mode(tb: &Testbed, expected: &str) {
    wait_until(
        Duration::from_secs(5),
        "peer authentication applied",
        || {
            let dump = tb.admin_json("node2", "/config_dump")?;
            Ok(dump["enrolled_pods"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "server-b" && p["peer_authentication"] == expected))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn plaintext_to_meshed_pods_follows_the_namespace_peer_authentication() {
    let mut mesh = meshed_testbed();
    let server = mesh.tb.pod("mesh", "server-b").clone();
    let outsider = mesh.tb.pod("plain", "outsider").clone();
    let client = mesh.tb.pod("mesh", "client-a").clone();
    let url = format!("http://{}:{APP_PORT}/", server.ipv4());

    // PERMISSIVE (the default): delivered by node2's proxy, and counted.
    wait_mode(&mesh.tb, "PERMISSIVE");
    assert_eq!(curl_from_pod(&mesh.tb, &outsider, &url), "200");
    assert_eq!(plaintext_counters(&mesh.tb, "node2"), (1, 0));
    let stats = mesh.tb.admin_json("node2", "/stats").expect("stats");
    let series: Vec<&Value> = stats["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|s| s["source_pod"] == "plaintext")
        .collect();
    assert_eq!(series.len(), 1, "{stats}");
    assert_eq!(
        series[0]["destination"],
        format!("{}:{APP_PORT}", server.ipv4())
    );
    assert_eq!(series[0]["opened"], 1);

    // STRICT: the outsider is reset at once, with a log line; meshed traffic and the node's
    // own probes still get through.
    set_peer_authentication(&mut mesh, "strict");
    wait_mode(&mesh.tb, "STRICT");
    assert_eq!(curl_from_pod(&mesh.tb, &outsider, &url), "000");
    assert_eq!(plaintext_counters(&mesh.tb, "node2").1, 1);
    let log = mesh.tb.agent_log("node2");
    assert!(
        log.contains("plaintext refused") && log.contains(&outsider.ipv4().to_string()),
        "the refusal is logged with the peer:\n{log}"
    );
    assert_eq!(
        curl_from_pod(&mesh.tb, &client, &url),
        "200",
        "mTLS still works"
    );
    assert_eq!(
        curl_from_node(&mesh.tb, "node2", &url),
        "200",
        "kubelet probe"
    );
    let (permitted, refused) = plaintext_counters(&mesh.tb, "node2");
    assert_eq!(
        (permitted, refused),
        (2, 1),
        "the probe counts as permitted"
    );

    // A typo keeps the last good mode and says where.
    set_peer_authentication(&mut mesh, "strikt");
    wait_until(Duration::from_secs(5), "config error reported", || {
        let dump = mesh.tb.admin_json("node2", "/config_dump")?;
        Ok(dump["config_errors"].to_string().contains("strikt"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let dump = mesh.tb.admin_json("node2", "/config_dump").expect("dump");
    assert!(
        dump["config_errors"].to_string().contains("Namespace mesh"),
        "{}",
        dump["config_errors"]
    );
    wait_mode(&mesh.tb, "STRICT");
    assert_eq!(curl_from_pod(&mesh.tb, &outsider, &url), "000");

    // With node2's agent dead, the STRICT pod stays closed to plaintext (the SYN is dropped).
    mesh.tb
        .kill_agent("node2", Signal::SIGKILL)
        .expect("kill agent");
    assert_eq!(curl_from_pod(&mesh.tb, &outsider, &url), "000");
    assert_eq!(
        curl_from_node(&mesh.tb, "node2", &url),
        "000",
        "without the agent nothing can tell a probe from other plaintext"
    );
}

#[test]
fn a_dead_agent_leaves_a_permissive_pod_reachable_and_a_new_agent_takes_capture_back() {
    let mesh = meshed_testbed();
    let server = mesh.tb.pod("mesh", "server-b").clone();
    let outsider = mesh.tb.pod("plain", "outsider").clone();
    let url = format!("http://{}:{APP_PORT}/", server.ipv4());
    wait_mode(&mesh.tb, "PERMISSIVE");

    mesh.tb
        .kill_agent("node2", Signal::SIGKILL)
        .expect("kill agent");
    assert_eq!(
        curl_from_pod(&mesh.tb, &outsider, &url),
        "200",
        "PERMISSIVE fails open: plaintext reaches the application directly"
    );

    let options = AgentOptions {
        extra_args: mesh.ca.agent_args("node2"),
        ..Default::default()
    };
    mesh.tb.start_agent("node2", &options).expect("agent back");
    assert_eq!(curl_from_pod(&mesh.tb, &outsider, &url), "200");
    assert_eq!(
        plaintext_counters(&mesh.tb, "node2"),
        (1, 0),
        "the new agent carries plaintext again"
    );
    let dump = mesh.tb.admin_json("node2", "/config_dump").expect("dump");
    assert_eq!(
        dump["datapath_maps"]["inbound_addresses"], dump["datapath_maps"]["inbound_listeners"],
        "every captured address has a live listener: {}",
        dump["datapath_maps"]
    );
}

/// The peer address the socat server below reports to `pod` connecting to `addr`.
fn peer_seen_by_server(tb: &Testbed, pod: &Pod, addr: &str) -> IpAddr {
    let mut socat = Command::new("socat");
    socat.args(["-u", addr, "-"]);
    let output = tb.run_in_pod(pod, socat).expect("run socat");
    let text = String::from_utf8_lossy(&output.stdout);
    let text = text.trim().trim_start_matches('[').trim_end_matches(']');
    text.parse().unwrap_or_else(|_| {
        panic!(
            "socat printed {text:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn mtls_connections_reach_the_application_from_the_client_pods_address() {
    let mesh = meshed_testbed();
    let server = mesh.tb.pod("mesh", "server-b").clone();
    for listen in [
        "TCP4-LISTEN:9000,fork,reuseaddr",
        "TCP6-LISTEN:9001,fork,reuseaddr,ipv6only=1",
    ] {
        let mut socat = Command::new("socat");
        socat.args([listen, "SYSTEM:echo $SOCAT_PEERADDR"]);
        mesh.tb
            .spawn_in_pod(&server, socat)
            .expect("socat server")
            .detach();
    }
    mesh.tb.wait_listening(&server, 9000).expect("listening");
    mesh.tb.wait_listening(&server, 9001).expect("listening");
    let v4 = format!("TCP4:{}:9000", server.ipv4());
    let v6 = format!("TCP6:[{}]:9001", server.ipv6());

    let across_nodes = mesh.tb.pod("mesh", "client-a").clone();
    let same_node = mesh.tb.pod("mesh", "client-b").clone();
    assert_eq!(
        peer_seen_by_server(&mesh.tb, &across_nodes, &v4),
        IpAddr::from(across_nodes.ipv4())
    );
    assert_eq!(
        peer_seen_by_server(&mesh.tb, &across_nodes, &v6),
        IpAddr::from(across_nodes.ipv6())
    );
    assert_eq!(
        peer_seen_by_server(&mesh.tb, &same_node, &v4),
        IpAddr::from(same_node.ipv4())
    );
    let stats = mesh.tb.admin_json("node2", "/stats").expect("stats");
    let through_hbone = stats["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|s| {
            s["source_pod"]
                .as_str()
                .is_some_and(|p| p.starts_with("spiffe://"))
        })
        .filter(|s| {
            s["destination"]
                .as_str()
                .is_some_and(|d| d.ends_with(":9000") || d.ends_with(":9001"))
        })
        .map(|s| s["opened"].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(through_hbone, 3, "all three went through HBONE: {stats}");

    // Plaintext (PERMISSIVE) is delivered from the pod's own address (docs/hbone.md says why).
    let outsider = mesh.tb.pod("plain", "outsider").clone();
    assert_eq!(
        peer_seen_by_server(&mesh.tb, &outsider, &v4),
        IpAddr::from(server.ipv4())
    );
    let dump = mesh.tb.admin_json("node2", "/config_dump").expect("dump");
    let preserved = dump["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "server-b")
        .map(|p| p["source_preservation"].clone());
    assert_eq!(
        preserved,
        Some(serde_json::json!({"ipv4": true, "ipv6": true}))
    );
}

/// The pod's policy routing for source preservation, as `ip rule` and the sysctl show it.
fn pod_routing(pod: &Pod) -> (bool, String) {
    let rules = Command::new("ip")
        .args(["netns", "exec", pod.netns(), "ip", "rule", "show"])
        .output()
        .expect("ip rule");
    let accept = Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.netns(),
            "cat",
            "/proc/sys/net/ipv4/tcp_fwmark_accept",
        ])
        .output()
        .expect("sysctl");
    (
        String::from_utf8_lossy(&rules.stdout).contains("lookup 20045"),
        String::from_utf8_lossy(&accept.stdout).trim().to_owned(),
    )
}

#[test]
fn leaving_the_mesh_removes_the_pods_policy_routing() {
    let mut mesh = meshed_testbed();
    let server = mesh.tb.pod("mesh", "server-b").clone();
    assert_eq!(
        pod_routing(&server),
        (true, "1".to_owned()),
        "set up at enrolment"
    );

    let labels = BTreeMap::new();
    mesh.tb
        .set_namespace_labels("mesh", labels)
        .expect("unlabel namespace");
    mesh.tb
        .wait_pod_enrolled(&server, false)
        .expect("un-enrolled");
    assert_eq!(
        pod_routing(&server),
        (false, "0".to_owned()),
        "nothing of the mesh stays in the pod"
    );
}
