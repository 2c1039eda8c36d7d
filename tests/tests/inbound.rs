//! Plaintext arriving at meshed pods from outside the mesh, on the testbed with real clients:
//! the inbound sk_lookup program hands it to the node proxy, which follows the namespace's
//! peer authentication (PERMISSIVE delivers and counts, STRICT resets) and the pod's
//! AuthorizationPolicies, at every address of the pod; from the node's own addresses only
//! the kubelet's probes get past them; a dead agent leaves a STRICT pod closed. Needs root.

use std::{collections::BTreeMap, net::IpAddr, process::Command, time::Duration};

use nodemesh_testbed::{
    AgentOptions, MESH_LABEL, MeshCa, Pod, PodSpec, Signal, Testbed, TestbedConfig, TopologySpec,
    get_on_connection, is_root, wait_until,
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

/// The same from the node's own network namespace, as a hostNetwork pod (or NodePort
/// traffic SNATed to the node) reaches a pod.
fn curl_from_node(tb: &Testbed, node: &str, url: &str) -> String {
    curl_from_node_with(tb, node, url, &[])
}

/// The kubelet's readiness probe of `url`, as it makes it: a GET from the node.
fn kubelet_probe(tb: &Testbed, node: &str, url: &str) -> String {
    curl_from_node_with(tb, node, url, &["-H", "User-Agent: kube-probe/1.36"])
}

fn curl_from_node_with(tb: &Testbed, node: &str, url: &str, extra: &[&str]) -> String {
    let netns = tb.node(node).expect("node").netns().to_owned();
    let output = Command::new("ip")
        .args(["netns", "exec", &netns, "curl"])
        .args(extra)
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
    wait_pod_mode(tb, "server-b", expected);
}

/// Waits until node2's agent reports `expected` for mesh/`pod`.
fn wait_pod_mode(tb: &Testbed, pod: &str, expected: &str) {
    wait_until(
        Duration::from_secs(5),
        "peer authentication applied",
        || {
            let dump = tb.admin_json("node2", "/config_dump")?;
            Ok(dump["enrolled_pods"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == pod && p["peer_authentication"] == expected))
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

    // A plaintext connection the outsider holds through the switch to STRICT.
    let mut held = mesh
        .tb
        .hold_connection(&outsider, 7100, (server.ipv4(), APP_PORT).into())
        .expect("held connection");
    let (code, _) = get_on_connection(&mut held, "/").expect("GET before STRICT");
    assert_eq!(code, 200);

    // STRICT: the outsider is reset at once, with a log line; meshed traffic still gets
    // through, and so does nothing else from the node (server-b has no probes).
    set_peer_authentication(&mut mesh, "strict");
    wait_mode(&mesh.tb, "STRICT");
    wait_until(Duration::from_secs(5), "the held connection reset", || {
        Ok(get_on_connection(&mut held, "/").is_err())
    })
    .expect("the connection opened under PERMISSIVE is reset");
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
        "000",
        "the node's address is no exemption"
    );
    assert_eq!(plaintext_counters(&mesh.tb, "node2"), (2, 2));

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

/// An AuthorizationPolicy `mesh/<name>` denying everything to the pods labelled `app`.
fn deny_all(name: &str, app: &str) -> Value {
    serde_json::json!({
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "mesh"},
        "spec": {"selector": {"matchLabels": {"app": app}}, "action": "DENY", "rules": [{}]},
    })
}

/// Waits until node2's agent applies `mesh/<policy>` to `mesh/<pod>`.
fn wait_policy(tb: &Testbed, policy: &str, pod: &str) {
    wait_until(Duration::from_secs(10), "policy loaded", || {
        let dump = tb.admin_json("node2", "/config_dump")?;
        Ok(dump["authorization_policies"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["policy"] == format!("mesh/{policy}")
                    && p["selects"].to_string().contains(&format!("mesh/{pod}"))
            }))
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// What mesh/probed (probe `GET /healthz` on 8080, the application on 8081 too) lets in
/// when STRICT or a policy refuses plaintext: the kubelet's probe, and nothing else.
fn assert_only_the_probe_passes(tb: &Testbed, probed: &Pod, refused_by: &str) {
    let url = |port: u16, path: &str| format!("http://{}:{port}{path}", probed.ipv4());
    let from_node = |url: String, extra: &[&str]| curl_from_node_with(tb, "node2", &url, extra);
    assert_eq!(
        kubelet_probe(tb, "node2", &url(APP_PORT, "/healthz")),
        "200"
    );
    assert_eq!(from_node(url(APP_PORT, "/admin"), &[]), "403");
    assert_eq!(
        from_node(url(APP_PORT, "/healthz/../admin"), &["--path-as-is"]),
        "403",
        "the probe's path is compared normalised"
    );
    assert_eq!(from_node(url(8081, "/"), &[]), "000");
    let outsider = tb.pod("plain", "outsider");
    assert_eq!(
        curl_from_pod(tb, outsider, &url(APP_PORT, "/healthz")),
        "000",
        "the probe's path is no way in for anyone but the node"
    );
    let log = tb.agent_log("node2");
    assert!(
        log.contains("authorization: request denied") && log.contains(refused_by),
        "{log}"
    );
}

#[test]
fn from_the_node_only_the_kubelets_probes_pass_strict_and_policies() {
    let mut mesh = meshed_testbed();
    let spec = PodSpec::new("mesh", "probed").with_http_probe(APP_PORT, "/healthz");
    let probed = mesh.tb.add_pod("node2", spec).expect("pod with a probe");
    mesh.tb.wait_pod_enrolled(&probed, true).expect("enrolled");
    // The application on the probe's port, and on a port no probe uses.
    for port in [APP_PORT, 8081] {
        mesh.tb
            .start_http_server(&probed, port)
            .expect("http server");
    }

    // PERMISSIVE without a policy: a client on the node (a hostNetwork pod) reaches the
    // application on any port, like any other plaintext client.
    wait_pod_mode(&mesh.tb, "probed", "PERMISSIVE");
    for port in [APP_PORT, 8081] {
        let url = format!("http://{}:{port}/admin", probed.ipv4());
        assert_eq!(curl_from_node(&mesh.tb, "node2", &url), "200", "{url}");
    }

    // STRICT refuses the node's requests as an outsider's, except the probe's.
    set_peer_authentication(&mut mesh, "strict");
    wait_pod_mode(&mesh.tb, "probed", "STRICT");
    assert_only_the_probe_passes(&mesh.tb, &probed, "STRICT");

    // So does a DENY-all policy under PERMISSIVE.
    set_peer_authentication(&mut mesh, "permissive");
    wait_pod_mode(&mesh.tb, "probed", "PERMISSIVE");
    let policy = deny_all("probed-deny-all", "probed");
    mesh.tb
        .apply_object("policy-probed-deny-all.yaml", &policy)
        .expect("policy");
    wait_policy(&mesh.tb, "probed-deny-all", "probed");
    assert_only_the_probe_passes(&mesh.tb, &probed, "mesh/probed-deny-all");
}

/// The link-local IPv6 address node2's agent captures for mesh/server-b.
fn captured_link_local(tb: &Testbed) -> String {
    let dump = tb.admin_json("node2", "/config_dump").expect("dump");
    let server = dump["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "server-b")
        .cloned()
        .unwrap_or_default();
    server["inbound_addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|a| a.starts_with("fe80:"))
        .unwrap_or_else(|| panic!("no link-local address captured: {server}"))
        .to_owned()
}

#[test]
fn strict_covers_every_address_of_the_pod_link_local_and_secondary_too() {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace("nmin").expect("config");
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    let server = tb.pod("mesh", "server-b").clone();
    // A second address on the pod (as a secondary interface brings one), routed by the node.
    let secondary = "198.18.2.200";
    for (netns, args) in [
        (
            server.netns(),
            ["addr", "add", "198.18.2.200/32", "dev", "eth0"],
        ),
        (
            tb.node("node2").expect("node").netns(),
            ["route", "add", "198.18.2.200/32", "dev", server.host_veth()],
        ),
    ] {
        let status = Command::new("ip")
            .args(["netns", "exec", netns, "ip"])
            .args(args)
            .status()
            .expect("ip");
        assert!(status.success(), "ip {args:?} in {netns}");
    }
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 3600).expect("CA");
    tb.start_agents_with_ca(&ca).expect("agents");
    tb.start_http_server(&server, APP_PORT)
        .expect("http server");
    let mut mesh = Mesh { tb, ca };
    let link_local = captured_link_local(&mesh.tb);
    let urls = [
        format!("http://{secondary}:{APP_PORT}/"),
        format!("http://[{link_local}%25{}]:{APP_PORT}/", server.host_veth()),
    ];

    // PERMISSIVE: both addresses reach the application, through the proxy (counted).
    wait_mode(&mesh.tb, "PERMISSIVE");
    for url in &urls {
        assert_eq!(curl_from_node(&mesh.tb, "node2", url), "200", "{url}");
    }
    assert_eq!(plaintext_counters(&mesh.tb, "node2"), (2, 0));

    // STRICT refuses plaintext at those addresses as at the pod's IPs.
    set_peer_authentication(&mut mesh, "strict");
    wait_mode(&mesh.tb, "STRICT");
    for url in &urls {
        assert_eq!(curl_from_node(&mesh.tb, "node2", url), "000", "{url}");
    }
    assert_eq!(plaintext_counters(&mesh.tb, "node2"), (2, 2));
}

#[test]
fn the_plaintext_listener_refuses_connections_to_itself() {
    let mesh = meshed_testbed();
    let server = mesh.tb.pod("mesh", "server-b").clone();
    let outsider = mesh.tb.pod("plain", "outsider").clone();
    for url in ["http://127.0.0.1:15006/", "http://[::1]:15006/"] {
        assert_eq!(curl_from_pod(&mesh.tb, &server, url), "000", "{url}");
    }
    // Both reached the listener (an absent one would count nothing), and went no further.
    assert_eq!(plaintext_counters(&mesh.tb, "node2"), (0, 2));
    let stats = mesh.tb.admin_json("node2", "/stats").expect("stats");
    assert!(
        !stats["connections"].to_string().contains(":15006"),
        "no connection was proxied to the listener: {stats}"
    );
    let log = mesh.tb.agent_log("node2");
    assert!(
        log.contains("plaintext refused: not addressed to one of the pod's addresses"),
        "{log}"
    );
    // The pod's plaintext budget is untouched: an outsider is served.
    let url = format!("http://{}:{APP_PORT}/", server.ipv4());
    assert_eq!(curl_from_pod(&mesh.tb, &outsider, &url), "200");
}
