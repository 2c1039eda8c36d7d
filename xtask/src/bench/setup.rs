//! The bench's testbed: both agents (with the CA), the servers in meshed and non-meshed pods,
//! and the Services and HTTPRoute the L7 and server-first scenarios go through.

use std::{process::Command, time::Duration};

use nodemesh_testbed::{AgentOptions, MeshCa, Pod, Testbed};

use super::{
    BANNER_DECLARED_IP, BANNER_DETECTED_IP, BANNER_OPAQUE_IP, BANNER_PORT, BenchArgs, ECHO_PORT,
    EXCLUDED_PORT, HTTP_PORT, L7_SERVICE_IP, OPAQUE_PORT, l7_route, stats::HttpPath,
};

/// What the scenarios reach: the workload binary, the servers and the HTTP paths.
pub(super) struct Bed {
    pub(super) workload: String,
    pub(super) server_a: Pod,
    pub(super) server_b: Pod,
    pub(super) direct_a: Pod,
    pub(super) direct_b: Pod,
    pub(super) l7_target: String,
    /// The query log of the resolver (dnsmasq in `direct_b`) the DNS scenario asks.
    pub(super) dns_log: std::path::PathBuf,
    /// The keep-alive HTTP/1.1 paths, each from its client pod to its target.
    pub(super) http_paths: [(HttpPath, (&'static str, &'static str), String); 4],
    /// The same paths between pods of node1.
    pub(super) same_node: super::same_node::Paths,
}

pub(super) fn prepare(tb: &mut Testbed, args: &BenchArgs, ca: &MeshCa) -> anyhow::Result<Bed> {
    start_agents(tb, args, ca)?;
    let workload = tb.workload_bin().display().to_string();
    // Meshed servers, and the same servers in non-meshed pods on the same nodes: traffic to a
    // meshed pod is captured at the destination too (inbound capture), so a direct baseline
    // needs a destination outside the mesh.
    let server_a = tb.pod("mesh", "server-a").clone();
    let server_b = tb.pod("mesh", "server-b").clone();
    let direct_a = tb.add_pod("node1", nodemesh_testbed::PodSpec::new("plain", "direct-a"))?;
    let direct_b = tb.add_pod("node2", nodemesh_testbed::PodSpec::new("plain", "direct-b"))?;
    start_servers(
        tb,
        &workload,
        [&server_a, &direct_a],
        [&server_b, &direct_b],
    )?;
    apply_services(tb, &workload, &server_b, &direct_b)?;
    super::zones::prepare(tb, &workload, [&server_a, &server_b, &direct_a])?;
    let same_node = super::same_node::prepare(tb, &workload, &server_a, &direct_a)?;
    let dns_log = super::dns::start_resolver(tb, &direct_b)?;
    let l7_target = format!("{L7_SERVICE_IP}:80");
    let http_paths = [
        (
            HttpPath::Direct,
            ("plain", "outsider"),
            format!("{}:{HTTP_PORT}", direct_b.ipv4()),
        ),
        (
            HttpPath::PlainL4,
            ("mesh", "client-a"),
            format!("{}:{HTTP_PORT}", direct_b.ipv4()),
        ),
        (
            HttpPath::MtlsL4,
            ("mesh", "client-a"),
            format!("{}:{HTTP_PORT}", server_b.ipv4()),
        ),
        (HttpPath::L7, ("mesh", "client-a"), l7_target.clone()),
    ];
    Ok(Bed {
        workload,
        server_a,
        server_b,
        direct_a,
        direct_b,
        l7_target,
        dns_log,
        http_paths,
        same_node,
    })
}

fn start_agents(tb: &mut Testbed, args: &BenchArgs, ca: &MeshCa) -> anyhow::Result<()> {
    for node in ["node1", "node2"] {
        let mut extra_args = vec![
            "--exclude-port".into(),
            EXCLUDED_PORT.to_string(),
            // The memory scenario holds `--idle-connections` from one pod.
            "--max-connections-per-pod".into(),
            (args.idle_connections + 1000).to_string(),
            "--dns-port".into(),
            "15053".into(),
        ];
        extra_args.extend(ca.agent_args(node));
        tb.start_agent(
            node,
            &AgentOptions {
                extra_args,
                ..Default::default()
            },
        )?;
    }
    Ok(())
}

/// Echo servers on node1's pods; HTTP and bulk echo servers on node2's.
fn start_servers(
    tb: &mut Testbed,
    workload: &str,
    node1: [&Pod; 2],
    node2: [&Pod; 2],
) -> anyhow::Result<()> {
    for pod in node1 {
        let mut echo = Command::new(workload);
        echo.args([
            "echo-server",
            "--ports",
            &format!("{ECHO_PORT},{EXCLUDED_PORT}"),
        ]);
        tb.spawn_in_pod(pod, echo)?.detach();
        tb.wait_listening(pod, ECHO_PORT)?;
        tb.wait_listening(pod, EXCLUDED_PORT)?;
    }
    for pod in node2 {
        start_http_server(tb, workload, pod)?;
        let mut bulk_echo = Command::new(workload);
        bulk_echo.args(["echo-server", "--ports", &ECHO_PORT.to_string()]);
        tb.spawn_in_pod(pod, bulk_echo)?.detach();
        tb.wait_listening(pod, ECHO_PORT)?;
    }
    Ok(())
}

/// The HTTP server of the keep-alive scenarios (1 KiB answers on `HTTP_PORT`) in `pod`,
/// once it listens.
pub(super) fn start_http_server(tb: &Testbed, workload: &str, pod: &Pod) -> anyhow::Result<()> {
    let mut http = Command::new(workload);
    http.args([
        "http-server",
        "--port",
        &HTTP_PORT.to_string(),
        "--body-bytes",
        "1024",
    ]);
    tb.spawn_in_pod(pod, http)?.detach();
    tb.wait_listening(pod, HTTP_PORT)?;
    Ok(())
}

/// The L7 Service with its HTTPRoute, and the banner servers behind two Services (detected,
/// and declared `appProtocol: tcp`); waits until node1's agent has them.
fn apply_services(
    tb: &mut Testbed,
    workload: &str,
    server_b: &Pod,
    direct_b: &Pod,
) -> anyhow::Result<()> {
    let service = nodemesh_testbed::cluster_state::service_object(
        "mesh",
        "bench-web",
        L7_SERVICE_IP,
        80,
        "http",
    );
    tb.apply_object("service-bench-web.yaml", &service)?;
    let slice = nodemesh_testbed::cluster_state::endpoint_slice_object(
        "bench-web",
        "http",
        HTTP_PORT,
        &[(server_b, false)],
    );
    tb.apply_object("endpointslice-bench-web.yaml", &slice)?;
    for pod in [server_b, direct_b] {
        let mut banner = Command::new(workload);
        banner.args(["banner-server", "--port", &BANNER_PORT.to_string()]);
        tb.spawn_in_pod(pod, banner)?.detach();
        tb.wait_listening(pod, BANNER_PORT)?;
    }
    for (name, ip, port, app_protocol) in [
        ("bench-banner", BANNER_DETECTED_IP, 80, None),
        ("bench-banner-tcp", BANNER_DECLARED_IP, 80, Some("tcp")),
        ("bench-banner-mysql", BANNER_OPAQUE_IP, OPAQUE_PORT, None),
    ] {
        let mut service =
            nodemesh_testbed::cluster_state::service_object("mesh", name, ip, port, "banner");
        if let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            ports[0].app_protocol = app_protocol.map(str::to_owned);
        }
        tb.apply_object(&format!("service-{name}.yaml"), &service)?;
        let slice = nodemesh_testbed::cluster_state::endpoint_slice_object(
            name,
            "banner",
            BANNER_PORT,
            &[(server_b, false)],
        );
        tb.apply_object(&format!("endpointslice-{name}.yaml"), &slice)?;
    }
    let route: serde_yaml::Value = serde_yaml::from_str(&l7_route("bench-web"))?;
    tb.apply_object("httproute-bench-web.yaml", &route)?;
    nodemesh_testbed::wait_until(Duration::from_secs(10), "L7 Service and route", || {
        let dump = tb.admin_json("node1", "/config_dump")?;
        Ok(dump["routes"].as_array().map(Vec::len) == Some(1)
            && Testbed::workload_services(&dump).len() == 4)
    })?;
    Ok(())
}
