//! `cargo xtask demo`: the main job. Builds a 2-node testbed (network namespaces for nodes and
//! pods, kubelet-style cgroups, Kubernetes YAML as cluster state), starts one agent per node,
//! sends real traffic between pods, prints which connections went through which node proxy,
//! then puts a Service with an HTTPRoute and an AuthorizationPolicy in front of the servers
//! (the examples of docs/l7.md) and shows requests split by weight and denied by policy, then
//! the cluster as an operator sees it from a laptop (MeshNodes, `nodemesh status --cluster`),
//! and tears everything down, also on failure or Ctrl-C.

use std::{collections::BTreeMap, process::Command, time::Duration};

use anyhow::{Context, bail};
use nodemesh_testbed::{AgentOptions, ClusterMode, MeshCa, Testbed};
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
/// Lifetime of the demo's workload certificates.
const CERT_TTL_SECONDS: u64 = 3600;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// What meshed pods' connects do while no agent runs: open or closed.
    #[arg(long, default_value = "open")]
    fail_mode: String,
}

struct Flow {
    label: &'static str,
    from: (&'static str, &'static str),
    program: Vec<String>,
    expect_proxied_by: Option<&'static str>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    crate::with_testbed("nmdemo", false, ClusterMode::ApiServer, |tb| {
        exercise(tb, args)
    })
}

fn exercise(tb: &mut Testbed, args: &DemoArgs) -> anyhow::Result<()> {
    show_pods(tb);
    // The CA serves for as long as the demo runs.
    let _ca = start_mesh(tb, args)?;
    let workload = tb.workload_bin().display().to_string();
    start_servers(tb, &workload)?;
    let server_b = tb.pod("mesh", "server-b").clone();
    let flows = flows(tb, &workload);
    let failures = send(tb, &flows)?;
    wait_counted(tb, &flows);
    let carried = carried(tb, &server_b.ipv4().to_string())?;
    if !carried.as_expected(failures) {
        bail!(
            "the demo's traffic did not behave as expected (agent logs: {})",
            tb.log_dir().display()
        );
    }
    l7(tb, &workload)?;
    from_a_laptop(tb)?;
    println!("   agent logs: {}", tb.log_dir().display());
    Ok(())
}

/// Every pod: node, addresses, whether it is meshed.
fn show_pods(tb: &Testbed) {
    println!("== testbed {}", tb.name());
    for pod in tb.pods() {
        println!(
            "   {:<6} {:<20} {:<13} {:<14} namespace {}",
            pod.node(),
            format!("{}/{}", pod.namespace(), pod.name()),
            pod.ipv4(),
            pod.ipv6(),
            match pod.namespace() {
                "mesh" => "meshed (nodemesh.io/mesh=enabled)",
                "nodemesh-system" => "not meshed (runs `nodemesh ca serve`)",
                _ => "not meshed",
            }
        );
    }
    println!(
        "   cluster state (Kubernetes YAML): {}",
        tb.cluster_state_dir().display()
    );
}

/// The CA in its pod, then an agent per node with its enrolled pods and certificates.
fn start_mesh(tb: &mut Testbed, args: &DemoArgs) -> anyhow::Result<MeshCa> {
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb
        .start_ca(&ca_pod, CERT_TTL_SECONDS)
        .context("starting the CA")?;
    println!(
        "== nodemesh CA serving at {} (root, issuer and tokens in {})",
        ca.addr(),
        ca.dir().display()
    );
    for node in ["node1", "node2"] {
        let options = AgentOptions {
            fail_mode: args.fail_mode.clone(),
            extra_args: [
                ca.agent_args(node),
                // MeshNode status every 2 s, so the laptop's view below is current.
                vec!["--node-status-interval-seconds".to_owned(), "2".to_owned()],
            ]
            .concat(),
            ..Default::default()
        };
        tb.start_agent(node, &options)
            .with_context(|| format!("starting the agent of {node}"))?;
        let dump = tb.admin_json(node, "/config_dump")?;
        let enrolled: Vec<String> = dump["enrolled_pods"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{} (cgroup id {})",
                    p["namespace"].as_str().unwrap_or("?"),
                    p["name"].as_str().unwrap_or("?"),
                    p["cgroup_id"]
                )
            })
            .collect();
        println!(
            "== agent on {node} ready; enrolled: {}",
            enrolled.join(", ")
        );
        for identity in dump["identities"].as_array().into_iter().flatten() {
            let remaining = identity["not_after_unix"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(unix_now());
            println!(
                "   certificate {} (expires in {}s, renewed at 70%)",
                identity["spiffe_id"].as_str().unwrap_or("?"),
                remaining
            );
        }
    }
    Ok(ca)
}

/// An HTTP server and an echo server in each of server-a and server-b.
fn start_servers(tb: &Testbed, workload: &str) -> anyhow::Result<()> {
    for (ns, name) in [("mesh", "server-a"), ("mesh", "server-b")] {
        let pod = tb.pod(ns, name).clone();
        let mut http = Command::new(workload);
        http.args([
            "http-server",
            "--port",
            &HTTP_PORT.to_string(),
            "--name",
            name,
        ]);
        tb.spawn_in_pod(&pod, http)?.detach();
        let mut echo = Command::new(workload);
        echo.args(["echo-server", "--ports", &ECHO_PORT.to_string()]);
        tb.spawn_in_pod(&pod, echo)?.detach();
        tb.wait_listening(&pod, HTTP_PORT)?;
        tb.wait_listening(&pod, ECHO_PORT)?;
    }
    Ok(())
}

/// The demo's connections: HTTP and TCP echo across nodes and on one, and one from outside
/// the mesh, each with the node whose proxy should carry it.
fn flows(tb: &Testbed, workload: &str) -> Vec<Flow> {
    let server_a = tb.pod("mesh", "server-a").clone();
    let server_b = tb.pod("mesh", "server-b").clone();
    let curl = |url: String| {
        vec![
            "curl".to_owned(),
            "--silent".into(),
            "--show-error".into(),
            "--max-time".into(),
            "5".into(),
            "--output".into(),
            "/dev/null".into(),
            "--write-out".into(),
            "HTTP %{http_code}, %{size_download} bytes, remote %{remote_ip}:%{remote_port}".into(),
            url,
        ]
    };
    let echo = |target: String| {
        vec![
            workload.to_owned(),
            "echo-client".into(),
            "--target".into(),
            target,
            "--bytes".into(),
            "65536".into(),
            "--connections".into(),
            "3".into(),
        ]
    };
    vec![
        Flow {
            label: "HTTP  client-a -> server-b (cross-node)",
            from: ("mesh", "client-a"),
            program: curl(format!("http://{}:{HTTP_PORT}/", server_b.ipv4())),
            expect_proxied_by: Some("node1"),
        },
        Flow {
            label: "HTTP  client-b -> server-a (cross-node)",
            from: ("mesh", "client-b"),
            program: curl(format!("http://{}:{HTTP_PORT}/", server_a.ipv4())),
            expect_proxied_by: Some("node2"),
        },
        Flow {
            label: "HTTP  client-a -> server-a (same node)",
            from: ("mesh", "client-a"),
            program: curl(format!("http://{}:{HTTP_PORT}/", server_a.ipv4())),
            expect_proxied_by: Some("node1"),
        },
        Flow {
            label: "TCP echo client-a -> server-b, IPv4",
            from: ("mesh", "client-a"),
            program: echo(format!("{}:{ECHO_PORT}", server_b.ipv4())),
            expect_proxied_by: Some("node1"),
        },
        Flow {
            label: "TCP echo client-b -> server-a, IPv6",
            from: ("mesh", "client-b"),
            program: echo(format!("[{}]:{ECHO_PORT}", server_a.ipv6())),
            expect_proxied_by: Some("node2"),
        },
        Flow {
            label: "HTTP  outsider -> server-b (not meshed)",
            from: ("plain", "outsider"),
            program: curl(format!("http://{}:{HTTP_PORT}/", server_b.ipv4())),
            // Not captured where it starts; node2's inbound capture takes it in (PERMISSIVE).
            expect_proxied_by: Some("node2"),
        },
    ]
}

/// Runs every flow from its pod and prints what it said; returns how many failed.
fn send(tb: &Testbed, flows: &[Flow]) -> anyhow::Result<usize> {
    println!("\n== traffic");
    let mut failures = 0;
    for flow in flows {
        let pod = tb.pod(flow.from.0, flow.from.1).clone();
        let mut command = Command::new(&flow.program[0]);
        command.args(&flow.program[1..]);
        let output = tb.run_in_pod(&pod, command)?;
        let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let status = if output.status.success() {
            "ok  "
        } else {
            failures += 1;
            "FAIL"
        };
        println!(
            "   [{status}] {:<42} {}",
            flow.label,
            if said.is_empty() {
                String::from_utf8_lossy(&output.stderr).trim().to_owned()
            } else {
                said
            }
        );
    }
    Ok(failures)
}

/// Waits (a moment at most) until the proxies have counted every connection: they count
/// one when both directions have finished.
fn wait_counted(tb: &Testbed, flows: &[Flow]) {
    let expected: u64 = flows
        .iter()
        .filter(|f| f.expect_proxied_by.is_some())
        .map(|f| if f.program[0] == "curl" { 1 } else { 3 })
        .sum();
    let _ = nodemesh_testbed::wait_until(
        Duration::from_secs(3),
        "proxies counted every connection",
        || {
            let closed: u64 = ["node1", "node2"]
                .iter()
                .map(|node| closed_total(tb, node))
                .sum();
            Ok(closed >= expected)
        },
    );
}

/// What the node proxies carried, as `GET /stats` tells.
struct Carried {
    /// Each source seen (a pod, `plaintext`, or a SPIFFE ID inbound), with its proxy.
    seen_sources: BTreeMap<String, &'static str>,
    /// Plaintext connections node2's proxy took in for mesh/server-b.
    plaintext_to_server_b: u64,
}

/// Prints each node proxy's connections by source and destination.
fn carried(tb: &Testbed, server_b_ip: &str) -> anyhow::Result<Carried> {
    println!("\n== what each node proxy carried (GET /stats on its admin port)");
    println!(
        "   outbound: captured from a local pod; to a meshed pod on another node it left in \
         mTLS (HBONE), to one on its own node it went to the inbound side in process, \
         otherwise as plain TCP"
    );
    println!(
        "   inbound: tunnels admitted for a local pod (HBONE, or handed over on the node), by \
         the peer's SPIFFE ID; plaintext from outside the mesh as `plaintext`"
    );
    println!(
        "   {:<6} {:<42} {:<26} {:>5} {:>10} {:>10}",
        "proxy",
        "source (pod, or SPIFFE ID if inbound)",
        "destination",
        "conns",
        "bytes out",
        "bytes in"
    );
    let mut seen_sources = BTreeMap::new();
    let mut plaintext_to_server_b = 0;
    for node in ["node1", "node2"] {
        let stats = tb.admin_json(node, "/stats")?;
        for series in stats["connections"].as_array().into_iter().flatten() {
            let source = series["source_pod"].as_str().unwrap_or("?").to_owned();
            let destination = series["destination"].as_str().unwrap_or("?");
            let opened = series["opened"].as_u64().unwrap_or(0);
            println!(
                "   {:<6} {:<42} {:<26} {:>5} {:>10} {:>10}",
                node,
                source,
                destination,
                opened,
                series["bytes_sent"].as_u64().unwrap_or(0),
                series["bytes_received"].as_u64().unwrap_or(0)
            );
            if node == "node2"
                && source == "plaintext"
                && destination == format!("{server_b_ip}:{HTTP_PORT}")
            {
                plaintext_to_server_b += opened;
            }
            seen_sources.insert(source, node);
        }
    }
    Ok(Carried {
        seen_sources,
        plaintext_to_server_b,
    })
}

impl Carried {
    /// Prints whether the outsider and the meshed pods went the way they should; true if
    /// they did and no flow failed.
    fn as_expected(&self, failures: usize) -> bool {
        let Carried {
            seen_sources,
            plaintext_to_server_b,
        } = self;
        let plaintext_to_server_b = *plaintext_to_server_b;
        let outsider_captured = seen_sources.contains_key("plain/outsider");
        println!(
            "\n   plain/outsider is not meshed: {}; {}",
            if outsider_captured {
                "node1's proxy CAPTURED its connection (unexpected)"
            } else {
                "its connection left node1 uncaptured"
            },
            if plaintext_to_server_b > 0 {
                format!(
                    "node2's proxy took it in for mesh/server-b and delivered it as plaintext \
                     (PERMISSIVE): {plaintext_to_server_b} connection(s) from `plaintext`"
                )
            } else {
                "node2's proxy did NOT take it in for mesh/server-b (unexpected)".to_owned()
            }
        );
        let encrypted = seen_sources.contains_key("spiffe://cluster.local/ns/mesh/sa/client-a")
            && seen_sources.contains_key("spiffe://cluster.local/ns/mesh/sa/client-b");
        println!(
            "   meshed pods' connections to meshed pods of the other node arrived over mutual \
             TLS: {}; on the same node the agent handed them from its outbound to its inbound \
             side, under the client's identity",
            if encrypted {
                "yes (HBONE, TLS 1.3, X25519MLKEM768)"
            } else {
                "NO (unexpected)"
            }
        );
        failures == 0
            && !outsider_captured
            && plaintext_to_server_b > 0
            && encrypted
            && seen_sources.contains_key("mesh/client-a")
            && seen_sources.contains_key("mesh/client-b")
    }
}

/// Services `web` (both servers), `web-a`, `web-b`; the weighted-split route and the policy
/// denying `/admin` on server-b; then requests from client-a.
fn l7(tb: &Testbed, workload: &str) -> anyhow::Result<()> {
    let a = tb.pod("mesh", "server-a").clone();
    let b = tb.pod("mesh", "server-b").clone();
    let services = [
        ("web", "198.18.200.20", vec![&a, &b]),
        ("web-a", "198.18.200.21", vec![&a]),
        ("web-b", "198.18.200.22", vec![&b]),
    ];
    for (name, ip, endpoints) in &services {
        let service = nodemesh_testbed::cluster_state::service_object("mesh", name, ip, 80, "http");
        tb.apply_object(&format!("service-{name}.yaml"), &service)?;
        let endpoints: Vec<_> = endpoints.iter().map(|p| (*p, false)).collect();
        let slice = nodemesh_testbed::cluster_state::endpoint_slice_object(
            name, "http", HTTP_PORT, &endpoints,
        );
        tb.apply_object(&format!("endpointslice-{name}.yaml"), &slice)?;
    }
    tb.apply_object(
        "httproute-web-split.yaml",
        &nodemesh_testbed::docs::example("l7.md", "split")?,
    )?;
    tb.apply_object(
        "policy-server-b-no-admin.yaml",
        &nodemesh_testbed::docs::example("l7.md", "policy-deny")?,
    )?;
    nodemesh_testbed::wait_until(
        Duration::from_secs(10),
        "routes and policies loaded",
        || {
            let node1 = tb.admin_json("node1", "/config_dump")?;
            let node2 = tb.admin_json("node2", "/config_dump")?;
            Ok(Testbed::workload_services(&node1).len() == 3
                && node1["routes"].as_array().map(Vec::len) == Some(1)
                && node2["authorization_policies"][0]["selects"][0] == "mesh/server-b")
        },
    )?;
    println!(
        "\n== L7: Service mesh/web (198.18.200.20:80, both servers) with HTTPRoute mesh/web-split \
         (80% to Service web-a, 20% to web-b), from docs/l7.md"
    );
    let client = tb.pod("mesh", "client-a").clone();
    let mut get = Command::new(workload);
    get.args(["http-get", "--target", "198.18.200.20:80", "--count", "200"]);
    let output = tb.run_in_pod(&client, get)?;
    let summary: Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or("null"),
    )
    .context("http-get's summary")?;
    let to_a = summary["servers"]["server-a"].as_u64().unwrap_or(0);
    let to_b = summary["servers"]["server-b"].as_u64().unwrap_or(0);
    println!(
        "   200 requests on one keep-alive connection from mesh/client-a, each routed on its own: \
         server-a {to_a}, server-b {to_b}"
    );
    let mut curl = Command::new("curl");
    curl.args([
        "--silent",
        "--max-time",
        "5",
        "--write-out",
        "\n%{http_code}",
        "http://198.18.200.22/admin/users",
    ]);
    let output = tb.run_in_pod(&client, curl)?;
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = said.rsplit_once('\n').unwrap_or(("", &said));
    let denied = format!("HTTP {code}: {}", body.trim());
    println!(
        "   GET /admin/users on server-b, AuthorizationPolicy mesh/server-b-no-admin (DENY /admin*), \
         enforced by node2:\n     {denied}"
    );
    if !denied.starts_with("HTTP 403") || to_a + to_b != 200 || to_a < to_b {
        bail!("L7 did not behave as expected: {summary} / {denied}");
    }
    Ok(())
}

/// What an operator sees with a kubeconfig and no shell on a node: the agents' MeshNode
/// objects (`kubectl get meshnodes`) and `nodemesh status` across the cluster, run from the
/// control plane's network namespace (docs/operations.md).
fn from_a_laptop(tb: &Testbed) -> anyhow::Result<()> {
    let api = tb.api()?;
    println!("\n== from a laptop: kubectl get meshnodes");
    for line in api.kubectl_ok(&["get", "meshnodes"])?.lines() {
        println!("   {line}");
    }
    println!("\n== from a laptop: nodemesh status --cluster");
    let mut status = Command::new(tb.nodemesh_bin());
    status
        .args(["status", "--cluster"])
        .env("KUBECONFIG", api.admin_kubeconfig());
    let output = api.output_in_netns(status)?;
    if !output.status.success() {
        bail!(
            "nodemesh status --cluster failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        println!("   {line}");
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn closed_total(tb: &Testbed, node: &str) -> u64 {
    tb.admin_json(node, "/stats")
        .ok()
        .and_then(|stats: Value| {
            stats["connections"]
                .as_array()
                .map(|a| a.iter().map(|s| s["closed"].as_u64().unwrap_or(0)).sum())
        })
        .unwrap_or(0)
}
