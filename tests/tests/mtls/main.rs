//! Mutual TLS on the testbed. Identities: `nodemesh ca serve` runs as a pod (as its Deployment
//! would), each node agent authenticates with its own token, and gets, renews and releases
//! certificates for exactly the identities of its own meshed pods. HBONE: traffic between
//! meshed pods crosses the wire only inside mTLS, checked with a packet capture; bad peers
//! are refused. Needs root.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nodemesh_testbed::{
    AgentOptions, MeshCa, Testbed, TestbedConfig, TopologySpec, is_root, scaled, wait_until,
};
use serde_json::Value;

struct Mesh {
    tb: Testbed,
    ca: MeshCa,
}

/// The standard testbed plus a CA pod on node1, with the CA started and listening.
fn mesh_with_ca(cert_ttl_seconds: u64) -> Mesh {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let topology = TopologySpec::standard_with_ca();
    let config = TestbedConfig::from_workspace("nmid").unwrap_or_else(|e| panic!("{e}"));
    let tb = Testbed::create(config, topology).expect("create testbed");
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb
        .start_ca(&ca_pod, cert_ttl_seconds)
        .expect("start the CA");
    Mesh { tb, ca }
}

/// Agent options using the CA with `token_node`'s token.
fn agent_options(mesh: &Mesh, token_node: &str) -> AgentOptions {
    AgentOptions {
        extra_args: mesh.ca.agent_args_with_token_of(token_node),
        ..Default::default()
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn identities(tb: &Testbed, node: &str) -> BTreeMap<String, Value> {
    let dump = tb.admin_json(node, "/config_dump").expect("config dump");
    identities_in(&dump)
}

fn identities_in(dump: &Value) -> BTreeMap<String, Value> {
    dump["identities"]
        .as_array()
        .expect("identities listed when a CA is configured")
        .iter()
        .map(|i| {
            (
                i["spiffe_id"].as_str().unwrap_or_default().to_owned(),
                i.clone(),
            )
        })
        .collect()
}

fn ca_log(mesh: &Mesh) -> String {
    mesh.ca.log()
}

#[test]
fn each_node_holds_exactly_its_own_pods_identities_and_renews_them() {
    let mesh = mesh_with_ca(4);
    for (node, token) in [("node1", "node1"), ("node2", "node2")] {
        // start_agent waits for /readyz, which requires every identity's certificate.
        mesh.tb
            .start_agent(node, &agent_options(&mesh, token))
            .expect("agent ready with certificates");
    }
    let node1 = identities(&mesh.tb, "node1");
    assert_eq!(
        node1.keys().collect::<Vec<_>>(),
        [
            "spiffe://cluster.local/ns/mesh/sa/client-a",
            "spiffe://cluster.local/ns/mesh/sa/server-a"
        ],
        "node1 holds its meshed pods' identities only (not the outsider's, not the CA's, not node2's)"
    );
    let node2 = identities(&mesh.tb, "node2");
    assert_eq!(
        node2.keys().collect::<Vec<_>>(),
        [
            "spiffe://cluster.local/ns/mesh/sa/client-b",
            "spiffe://cluster.local/ns/mesh/sa/server-b"
        ]
    );
    let chain = node1["spiffe://cluster.local/ns/mesh/sa/client-a"]["certificate_chain"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and issuer: {chain}"
    );
    assert!(
        ca_log(&mesh).contains("certificate issued"),
        "the CA logs every issuance: {}",
        ca_log(&mesh)
    );

    // 4 s certificates are renewed at 70%: wait (bounded) until each has been renewed.
    wait_until(Duration::from_secs(20), "every identity renewed", || {
        Ok(identities(&mesh.tb, "node1")
            .values()
            .chain(identities(&mesh.tb, "node2").values())
            .all(|i| i["renewals"].as_u64() >= Some(1)))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", identities(&mesh.tb, "node1")));
    let (status, _) = mesh.tb.admin_get("node1", "/readyz").expect("readyz");
    assert_eq!(status, 200, "still ready across renewals");
}

#[test]
fn an_agent_cannot_obtain_another_nodes_identities() {
    let mesh = mesh_with_ca(3600);
    // node2's agent presents node1's token: the CA sees node1 asking for node2's pods.
    let options = AgentOptions {
        wait_ready: false,
        ..agent_options(&mesh, "node1")
    };
    let error = refused_with(&mesh, &options, "403");
    assert!(error.contains("not on the caller's node node1"), "{error}");
    assert!(
        ca_log(&mesh).contains("request refused"),
        "the CA logs the refusal: {}",
        ca_log(&mesh)
    );
}

/// Starts node2's agent presenting `token_file` to the CA and waits until every identity it
/// wants was refused with `status` (the CA answers 401 for every token it does not accept); returns the
/// refusal.
fn refused_with_token(mesh: &Mesh, token_file: &Path, status: &str) -> String {
    let options = AgentOptions {
        wait_ready: false,
        extra_args: mesh.ca.agent_args_with_token_file(token_file),
        ..Default::default()
    };
    refused_with(mesh, &options, status)
}

/// Starts node2's agent with `options` (not waited for) and waits until every identity it
/// wants was refused with `status`: no certificate held, not ready. Stops the agent and
/// returns the refusal.
fn refused_with(mesh: &Mesh, options: &AgentOptions, status: &str) -> String {
    mesh.tb
        .start_agent("node2", options)
        .expect("agent started");
    wait_until(Duration::from_secs(10), "refusal reported", || {
        // The agent was not waited for: its admin port may not be listening yet.
        let Ok(dump) = mesh.tb.admin_json("node2", "/config_dump") else {
            return Ok(false);
        };
        let ids = identities_in(&dump);
        Ok(!ids.is_empty()
            && ids
                .values()
                .all(|i| i["last_error"].as_str().is_some_and(|e| e.contains(status))))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", identities(&mesh.tb, "node2")));
    let node2 = identities(&mesh.tb, "node2");
    assert!(
        node2.values().all(|i| i["not_after_unix"].is_null()),
        "no certificate held: {node2:?}"
    );
    let (readyz, _) = mesh.tb.admin_get("node2", "/readyz").expect("readyz");
    assert_eq!(readyz, 503, "not ready without certificates");
    mesh.tb
        .kill_agent("node2", nodemesh_testbed::Signal::SIGKILL)
        .expect("stop the agent");
    node2
        .values()
        .next()
        .and_then(|i| i["last_error"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// What the real API server's TokenReview tells the CA: a token of the agents' own
/// ServiceAccount, bound to node2's agent Pod, but for the API server's audience instead of
/// `nodemesh`, is refused; so is a token with the right audience of another ServiceAccount
/// (a workload on node2 that minted one for itself).
#[test]
fn the_ca_refuses_tokens_for_another_audience_or_of_another_service_account() {
    let mesh = mesh_with_ca(3600);
    let api = mesh.tb.api().expect("a real API server");
    let dir = tempfile::tempdir().expect("tempdir");

    let api_audience = api
        .project_token(
            "nodemesh-system",
            "nodemesh-agent",
            (
                "nodemesh-agent-node2",
                mesh.tb.agent_pod_uid("node2").expect("agent pod"),
            ),
            &[],
            &dir.path().join("api-audience"),
        )
        .expect("token");
    let error = refused_with_token(&mesh, &api_audience, "401 Unauthorized");
    assert!(
        error.contains("token rejected by the API server"),
        "{error}"
    );
    assert!(
        error.contains("is invalid for the target audiences [\"nodemesh\"]"),
        "{error}"
    );

    let client_b = mesh.tb.pod("mesh", "client-b").clone();
    let workload = api
        .project_token(
            "mesh",
            client_b.service_account(),
            (client_b.name(), client_b.uid()),
            &["nodemesh"],
            &dir.path().join("workload"),
        )
        .expect("token");
    let error = refused_with_token(&mesh, &workload, "401 Unauthorized");
    assert!(
        error.contains(
            "token belongs to system:serviceaccount:mesh:client-b, not to the agent's ServiceAccount"
        ),
        "{error}"
    );
    assert!(
        ca_log(&mesh).contains("request refused"),
        "the CA logs the refusals: {}",
        ca_log(&mesh)
    );
}

#[test]
fn identities_are_released_when_their_pods_leave_the_mesh() {
    let mut mesh = mesh_with_ca(3600);
    mesh.tb
        .start_agent("node1", &agent_options(&mesh, "node1"))
        .expect("agent ready");
    assert_eq!(identities(&mesh.tb, "node1").len(), 2);
    mesh.tb
        .set_namespace_labels("mesh", BTreeMap::new())
        .expect("remove the mesh label");
    wait_until(Duration::from_secs(5), "identities released", || {
        Ok(identities(&mesh.tb, "node1").is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", identities(&mesh.tb, "node1")));
}

fn start_meshed_agents(mesh: &Mesh) {
    for (node, token) in [("node1", "node1"), ("node2", "node2")] {
        mesh.tb
            .start_agent(node, &agent_options(mesh, token))
            .expect("agent ready with certificates");
    }
}

/// The sum of `field` over the connections from client-a in an agent's `/stats`.
fn from_client_a(stats: &Value, field: &str) -> u64 {
    stats["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["source_pod"] == "spiffe://cluster.local/ns/mesh/sa/client-a")
        .map(|s| s[field].as_u64().unwrap_or(0))
        .sum()
}

fn run(tb: &Testbed, ns: &str, name: &str, program: &str, args: &[&str]) -> std::process::Output {
    let pod = tb.pod(ns, name).clone();
    let mut command = Command::new(program);
    command.args(args);
    tb.run_in_pod(&pod, command).expect("run in pod")
}

mod hbone_peers;
mod resets;
mod rotation;
mod wire;
