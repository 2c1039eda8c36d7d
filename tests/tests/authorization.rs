//! The ways around AuthorizationPolicy at the destination, each tried on the testbed with
//! real clients and shown blocked (issue 14): paths that mean `/admin` to an application
//! without saying so, an h2c upgrade that turns the connection into HTTP/2 no policy sees,
//! and connections opened before a policy changed; and a connection between two pods of
//! one node, which the agent hands from its outbound to its inbound side without HBONE.
//! Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Output},
    time::Duration,
};

use nodemesh_testbed::{
    HBONE_PORT, MeshCa, Pod, Testbed, TestbedConfig, TopologySpec, established_connections,
    get_on_connection, hbone_connections, is_root, wait_until,
};
use serde_json::Value;

const APP_PORT: u16 = 8080;
const H2C_PORT: u16 = 8082;
const ECHO_PORT: u16 = 7000;
const CLIENT_A: &str = "spiffe://cluster.local/ns/mesh/sa/client-a";
const CLIENT_B: &str = "spiffe://cluster.local/ns/mesh/sa/client-b";

/// The meshed testbed with the HTTP application on server-a and server-b, the h2c server
/// on server-b and an echo server on server-a (tests may start one on server-b too).
fn setup() -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace("nmauth").expect("config");
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 3600).expect("CA");
    tb.start_agents_with_ca(&ca).expect("agents");
    for pod in [server(&tb, "a"), server(&tb, "b")] {
        tb.start_http_server(&pod, APP_PORT).expect("http server");
    }
    let mut h2c = Command::new(tb.workload_bin());
    h2c.args(["h2c-server", "--port", &H2C_PORT.to_string()]);
    tb.spawn_in_pod(&server(&tb, "b"), h2c)
        .expect("h2c server")
        .detach();
    tb.wait_listening(&server(&tb, "b"), H2C_PORT)
        .expect("h2c server listening");
    tb.start_echo_server(&server(&tb, "a"), ECHO_PORT)
        .expect("echo server");
    (tb, ca)
}

fn server(tb: &Testbed, which: &str) -> Pod {
    tb.pod("mesh", &format!("server-{which}")).clone()
}

fn client(tb: &Testbed, which: &str) -> Pod {
    tb.pod("mesh", &format!("client-{which}")).clone()
}

/// An AuthorizationPolicy `mesh/<name>` for the pods labelled `app`.
fn policy(name: &str, app: &str, action: &str, rules: Value) -> Value {
    serde_json::json!({
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "mesh"},
        "spec": {"selector": {"matchLabels": {"app": app}}, "action": action, "rules": rules},
    })
}

/// Applies `policy` (through the API server) and waits until `node`'s agent applies it to
/// `mesh/<pod>`, or, with `pod` None, selects no pod with it any more.
fn apply_policy(tb: &Testbed, node: &str, policy: &Value, pod: Option<&str>) {
    let name = policy["metadata"]["name"].as_str().unwrap_or_default();
    tb.apply_object(&format!("policy-{name}.yaml"), policy)
        .expect("policy");
    wait_until(Duration::from_secs(10), "policy applied", || {
        let dump = tb.admin_json(node, "/config_dump")?;
        let entry = dump["authorization_policies"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["policy"] == format!("mesh/{name}"))
            .cloned()
            .unwrap_or_default();
        let selects = entry["selects"].as_array().cloned().unwrap_or_default();
        Ok(match pod {
            Some(pod) => selects.iter().any(|p| p == &format!("mesh/{pod}")),
            None => !entry.is_null() && selects.is_empty(),
        })
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// `mesh/no-admin`: nobody reaches `/admin…` on server-b (an L7 policy: server-b's
/// streams are parsed as HTTP from then on).
fn deny_admin_on_server_b(tb: &Testbed) {
    let rules = serde_json::json!([{"to": [{"paths": ["/admin*"]}]}]);
    let no_admin = policy("no-admin", "server-b", "DENY", rules);
    apply_policy(tb, "node2", &no_admin, Some("server-b"));
}

fn run(tb: &Testbed, pod: &Pod, program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    tb.run_in_pod(pod, command).expect("run in pod")
}

/// `curl -s --path-as-is` (the path goes out exactly as written); returns (status, body).
fn curl(tb: &Testbed, pod: &Pod, url: &str) -> (u16, String) {
    let args = [
        "-s",
        "--path-as-is",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        url,
    ];
    let output = run(tb, pod, "curl", &args);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The path the application saw, from the HTTP application's `/echo` reflection.
fn seen_path(body: &str) -> String {
    let seen: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    seen["path"].as_str().unwrap_or_default().to_owned()
}

/// Runs nodemesh-workload in `pod`; returns its last stdout line as JSON (Null if none),
/// whether it succeeded, and its stderr.
fn workload(tb: &Testbed, pod: &Pod, args: &[&str]) -> (Value, bool, String) {
    let output = run(tb, pod, &tb.workload_bin().display().to_string(), args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or(Value::Null);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (summary, output.status.success(), stderr)
}

#[test]
fn paths_are_decided_and_forwarded_normalised() {
    let (tb, _ca) = setup();
    let client = client(&tb, "a");
    let b = server(&tb, "b").ipv4();
    let a = server(&tb, "a").ipv4();

    // Control: where no policy looks at paths (server-a), the application gets the path
    // exactly as written; many applications resolve it to /echo/admin themselves.
    let (code, body) = curl(
        &tb,
        &client,
        &format!("http://{a}:{APP_PORT}/echo/./x/..//admin"),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(seen_path(&body), "/echo/./x/..//admin");

    // Every way of writing /admin is /admin to a DENY on /admin* ...
    let evasions = [
        "/admin",
        "//admin",
        "/%61dmin",
        "/./admin",
        "/api/../admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/echo/..//admin/x",
    ];
    let all_denied = |policy: &str| {
        for evasion in evasions {
            let (code, body) = curl(&tb, &client, &format!("http://{b}:{APP_PORT}{evasion}"));
            assert_eq!(code, 403, "{policy}: {evasion}: {body}");
            assert!(
                body.contains(&format!("denied to {CLIENT_A}")) && body.contains(" /admin"),
                "{policy}: {evasion}: {body}"
            );
        }
    };
    deny_admin_on_server_b(&tb);
    all_denied("DENY /admin*");
    // ... and to an ALLOW on /public* (and /echo*) alone.
    let retired = policy("no-admin", "nobody", "DENY", serde_json::json!([{}]));
    apply_policy(&tb, "node2", &retired, None);
    let public = serde_json::json!([{"to": [{"paths": ["/public*", "/echo*"]}]}]);
    let public = policy("public", "server-b", "ALLOW", public);
    apply_policy(&tb, "node2", &public, Some("server-b"));
    all_denied("ALLOW /public*");
    // What is allowed reaches the application normalised, as it was decided.
    for (path, normalised) in [
        ("/echo/./x", "/echo/x"),
        ("/%65cho//x", "/echo/x"),
        ("/public/../echo/y", "/echo/y"),
    ] {
        let (code, body) = curl(&tb, &client, &format!("http://{b}:{APP_PORT}{path}"));
        assert_eq!(code, 200, "{path}: {body}");
        assert_eq!(seen_path(&body), normalised, "{path}");
    }
    // A path that reads differently to different servers is refused outright.
    for ambiguous in ["/public%2F..%2Fadmin", "/public/..;/admin"] {
        let (code, body) = curl(&tb, &client, &format!("http://{b}:{APP_PORT}{ambiguous}"));
        assert_eq!(code, 400, "{ambiguous}: {body}");
    }
}

#[test]
fn h2c_upgrades_are_refused_and_other_upgrades_need_a_policy_without_http_attributes() {
    let (tb, _ca) = setup();
    let (client_a, client_b) = (client(&tb, "a"), client(&tb, "b"));
    let server_b = server(&tb, "b");
    let b = server_b.ipv4();
    let smuggle = |pod: &Pod, target: String| {
        let args = [
            "h2c-smuggle",
            "--target",
            &target,
            "--upgrade-path",
            "/public",
            "--smuggled-path",
            "/admin",
        ];
        workload(&tb, pod, &args)
    };
    let ws = |pod: &Pod| {
        let url = format!("ws://{b}:{APP_PORT}/ws");
        workload(&tb, pod, &["ws-echo", "--url", &url, "--messages", "2"])
    };

    // Controls: the h2c server switches and serves the smuggled /admin over HTTP/2 (from
    // inside its own pod), and WebSocket crosses the mesh while no policy applies.
    let (summary, ok, stderr) = smuggle(&server_b, format!("127.0.0.1:{H2C_PORT}"));
    assert!(ok, "{summary} {stderr}");
    assert_eq!(summary["upgrade_status"], 101, "{summary}");
    assert!(
        summary["smuggled_body"].to_string().contains("HTTP/2"),
        "{summary}"
    );
    let (summary, ok, stderr) = ws(&client_a);
    assert!(ok, "{summary} {stderr}");

    // With a DENY on /admin: the h2c upgrade is removed, so /public is answered as HTTP/1.1
    // and nothing is smuggled; /admin itself is denied.
    deny_admin_on_server_b(&tb);
    let (summary, _, stderr) = smuggle(&client_a, format!("{b}:{H2C_PORT}"));
    assert_eq!(summary["upgrade_status"], 200, "{summary} {stderr}");
    assert!(summary["smuggled_status"].is_null(), "{summary}");
    let (code, _) = curl(&tb, &client_a, &format!("http://{b}:{H2C_PORT}/admin"));
    assert_eq!(code, 403);
    // A WebSocket would be opaque bytes to /admin's DENY: refused.
    let (_, ok, stderr) = ws(&client_a);
    assert!(!ok && stderr.contains("403"), "{stderr}");

    // Allowed without HTTP attributes (client-a), an upgrade passes; allowed only by a
    // path rule (client-b), it does not.
    let unmatched = policy("no-admin", "nobody", "DENY", serde_json::json!([{}]));
    apply_policy(&tb, "node2", &unmatched, None);
    let rules = serde_json::json!([
        {"from": [{"principals": [CLIENT_A]}]},
        {"from": [{"principals": [CLIENT_B]}], "to": [{"paths": ["/ws", "/public*"]}]},
    ]);
    apply_policy(
        &tb,
        "node2",
        &policy("upgrades", "server-b", "ALLOW", rules),
        Some("server-b"),
    );
    let (summary, ok, stderr) = ws(&client_a);
    assert!(ok, "{summary} {stderr}");
    let (_, ok, stderr) = ws(&client_b);
    assert!(!ok && stderr.contains("403"), "{stderr}");
    let (code, _) = curl(&tb, &client_b, &format!("http://{b}:{APP_PORT}/public"));
    assert_eq!(code, 200, "client-b's HTTP is allowed by its path rule");
}

/// Whether `stream` still echoes.
fn echoes(stream: &mut TcpStream) -> bool {
    let mut echoed = [0u8; 4];
    stream.write_all(b"ping").is_ok()
        && stream.read_exact(&mut echoed).is_ok()
        && &echoed == b"ping"
}

#[test]
fn policy_changes_reach_connections_opened_before_them() {
    let (tb, _ca) = setup();
    let (client_a, client_b) = (client(&tb, "a"), client(&tb, "b"));
    let (a, b) = (server(&tb, "a"), server(&tb, "b"));

    // L7: requests on a connection opened before a DENY are decided under the DENY.
    deny_admin_on_server_b(&tb);
    let mut http = tb
        .hold_connection(&client_a, 7100, (b.ipv4(), APP_PORT).into())
        .expect("held connection");
    let (code, body) = get_on_connection(&mut http, "/echo/before").expect("GET");
    assert_eq!(code, 200, "{body}");
    let revoke = serde_json::json!([{"from": [{"principals": [CLIENT_A]}]}]);
    apply_policy(
        &tb,
        "node2",
        &policy("revoke-a", "server-b", "DENY", revoke),
        Some("server-b"),
    );
    let (code, body) = get_on_connection(&mut http, "/echo/after").expect("GET");
    assert_eq!(code, 403, "the next request on the same connection: {body}");
    assert!(body.contains(&format!("denied to {CLIENT_A}")), "{body}");
    let stats = tb.admin_json("node2", "/stats").expect("stats");
    let tunnels: Vec<&Value> = stats["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["source_pod"] == CLIENT_A && s["destination"] == format!("{}:{APP_PORT}", b.ipv4())
        })
        .collect();
    assert_eq!(tunnels.len(), 1, "{stats}");
    assert_eq!(
        tunnels[0]["opened"], 1,
        "both requests on one tunnel: {stats}"
    );

    // L4: a tunnel decided at its CONNECT is reset when a DENY for its peer arrives.
    let mut tcp = tb
        .hold_connection(&client_b, 7101, (a.ipv4(), ECHO_PORT).into())
        .expect("held connection");
    assert!(echoes(&mut tcp), "the tunnel works before the change");
    let revoke = serde_json::json!([{"from": [{"principals": [CLIENT_B]}]}]);
    apply_policy(
        &tb,
        "node1",
        &policy("revoke-b", "server-a", "DENY", revoke),
        Some("server-a"),
    );
    wait_until(Duration::from_secs(10), "the tunnel reset", || {
        Ok(!echoes(&mut tcp))
    })
    .expect("the held tunnel ends once the DENY is in force");
    let log = tb.agent_log("node1");
    assert!(
        log.contains("authorization withdrawn by a policy change: tunnel reset")
            && log.contains("mesh/revoke-b"),
        "{log}"
    );
}

/// The connections in `pod`'s network namespace to or from the HBONE port.
fn hbone_sockets(pod: &Pod) -> usize {
    hbone_connections(pod.netns()).expect("ss").len()
}

#[test]
fn a_same_node_connection_skips_hbone_and_is_decided_by_the_destination() {
    let (tb, _ca) = setup();
    let (client_a, a, b) = (client(&tb, "a"), server(&tb, "a"), server(&tb, "b"));
    tb.start_echo_server(&b, ECHO_PORT).expect("echo server");

    // The control: across nodes, the connection is an HBONE tunnel, and server-b's pod holds
    // its HBONE end: the count below sees a tunnel where there is one.
    let mut across = tb
        .hold_connection(&client_a, 7102, (b.ipv4(), ECHO_PORT).into())
        .expect("held connection");
    assert!(echoes(&mut across), "client-a to server-b");
    assert!(hbone_sockets(&b) >= 1, "an HBONE tunnel in server-b's pod");

    // Same node: delivered, from client-a's own address, and no HBONE socket anywhere on
    // the way (server-a's pod would hold the tunnel's end).
    let mut held = tb
        .hold_connection(&client_a, 7103, (a.ipv4(), ECHO_PORT).into())
        .expect("held connection");
    assert!(echoes(&mut held), "client-a to server-a");
    let in_server = established_connections(a.netns()).expect("ss");
    assert!(
        in_server
            .iter()
            .any(|(local, peer)| local.port() == ECHO_PORT
                && peer.ip().to_canonical() == client_a.ipv4()),
        "the application sees client-a's address: {in_server:?}"
    );
    assert_eq!(
        hbone_sockets(&a),
        0,
        "no HBONE in server-a's pod: {in_server:?}"
    );
    let in_client = established_connections(client_a.netns()).expect("ss");
    let to_a = SocketAddr::from((a.ipv4(), HBONE_PORT));
    assert!(
        !in_client.iter().any(|(_, peer)| *peer == to_a),
        "nor one from client-a to server-a: {in_client:?}"
    );
    // Admitted by the destination's side, under the identity the capture gave it.
    let stats = tb.admin_json("node1", "/stats").expect("stats");
    let admitted = (stats["connections"].as_array().into_iter().flatten()).any(|s| {
        s["source_pod"] == CLIENT_A && s["destination"] == format!("{}:{ECHO_PORT}", a.ipv4())
    });
    assert!(admitted, "{stats}");

    // The attacks: a pod of the same node is held to server-a's policies as any other.
    // Where a policy looks at requests (here on the HTTP port only), each is decided, on
    // its normalised path.
    let no_admin = serde_json::json!([{"to": [{"ports": [APP_PORT], "paths": ["/admin*"]}]}]);
    apply_policy(
        &tb,
        "node1",
        &policy("no-admin-a", "server-a", "DENY", no_admin),
        Some("server-a"),
    );
    let app = format!("http://{}:{APP_PORT}", a.ipv4());
    let (code, body) = curl(&tb, &client_a, &format!("{app}/public/%2e%2e/admin"));
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(&tb, &client_a, &format!("{app}/echo/x"));
    assert_eq!(
        (code, seen_path(&body)),
        (200, "/echo/x".to_owned()),
        "{body}"
    );
    assert!(
        echoes(&mut held),
        "the echo port is not one the policy looks at"
    );
    // A DENY of client-a resets the connection it holds and refuses its next one, while
    // client-b, from the other node, still gets through.
    let deny_a = serde_json::json!([{"from": [{"principals": [CLIENT_A]}]}]);
    apply_policy(
        &tb,
        "node1",
        &policy("deny-a", "server-a", "DENY", deny_a),
        Some("server-a"),
    );
    wait_until(Duration::from_secs(10), "the held connection reset", || {
        Ok(!echoes(&mut held))
    })
    .expect("the same-node connection ends once the DENY is in force");
    let mut next = tb
        .hold_connection(&client_a, 7104, (a.ipv4(), ECHO_PORT).into())
        .expect("held connection");
    assert!(
        !echoes(&mut next),
        "a new connection from client-a is refused"
    );
    let log = tb.agent_log("node1");
    assert!(
        log.contains("authorization withdrawn by a policy change: tunnel reset")
            && log.contains("authorization: connection denied")
            && log.contains("mesh/deny-a"),
        "{log}"
    );
    let mut from_b = tb
        .hold_connection(&client(&tb, "b"), 7105, (a.ipv4(), ECHO_PORT).into())
        .expect("held connection");
    assert!(echoes(&mut from_b), "client-b is not denied");

    // Both sides reported the connection that was reset: the destination's line too, with
    // the identity the capture gave it.
    let destination_line = |line: &&str| {
        let Ok(line) = serde_json::from_str::<Value>(line) else {
            return false;
        };
        line["kind"] == "connection"
            && line["reporter"] == "destination"
            && line["src_principal"] == CLIENT_A
            && line["dst_workload"] == "server-a"
            && line["destination"] == format!("{}:{ECHO_PORT}", a.ipv4())
            && line["mutual_tls"] == true
    };
    wait_until(
        Duration::from_secs(5),
        "the destination's access log line",
        || Ok(tb.agent_log("node1").lines().any(|l| destination_line(&l))),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}
