//! Keep-alive HTTP/1.1 between pods of one node (node1), where a connection to a meshed pod
//! is handed from the outbound to the inbound side in process instead of going over HBONE:
//! direct (non-meshed pods), meshed pod to meshed pod (L4), and through a Service with an
//! HTTPRoute whose endpoint is on the node (the L7 proxy's pooled connection, admitted the
//! same way).
//!
//! Run after the other scenarios: the L7 proxy keeps its connection to the endpoint pooled,
//! and node1's inbound side counts it as open, which `wait_proxy_idle` would wait for.

use std::time::Duration;

use nodemesh_testbed::{Pod, Testbed};

use super::{
    BenchArgs, HTTP_PORT, l7_route, scenarios::keep_alive_run, setup::start_http_server,
    stats::HttpRuns,
};

/// The Service (with an HTTPRoute) in front of server-a, on the client's node.
const SERVICE: &str = "bench-web-local";
const SERVICE_IP: &str = "198.18.201.11";

/// The paths, each from its client pod to its target.
pub(super) struct Paths([(&'static str, (&'static str, &'static str), String); 3]);

/// Each path's runs, in the order of `Paths`.
#[derive(Default)]
pub(super) struct Runs([HttpRuns; 3]);

/// HTTP servers in server-a (meshed) and direct-a (not), both on node1, and the Service
/// with its route in front of server-a; waits until node1's agent has the route.
pub(super) fn prepare(
    tb: &mut Testbed,
    workload: &str,
    server_a: &Pod,
    direct_a: &Pod,
) -> anyhow::Result<Paths> {
    for pod in [server_a, direct_a] {
        start_http_server(tb, workload, pod)?;
    }
    let service =
        nodemesh_testbed::cluster_state::service_object("mesh", SERVICE, SERVICE_IP, 80, "http");
    tb.apply_object(&format!("service-{SERVICE}.yaml"), &service)?;
    let slice = nodemesh_testbed::cluster_state::endpoint_slice_object(
        SERVICE,
        "http",
        HTTP_PORT,
        &[(server_a, false)],
    );
    tb.apply_object(&format!("endpointslice-{SERVICE}.yaml"), &slice)?;
    let route: serde_yaml::Value = serde_yaml::from_str(&l7_route(SERVICE))?;
    tb.apply_object(&format!("httproute-{SERVICE}.yaml"), &route)?;
    nodemesh_testbed::wait_until(Duration::from_secs(10), "the same-node route", || {
        let dump = tb.admin_json("node1", "/config_dump")?;
        Ok((dump["routes"].as_array().into_iter().flatten()).any(|r| {
            (r["route"].as_str()).is_some_and(|name| name.ends_with(&format!("mesh/{SERVICE}")))
        }))
    })?;
    Ok(Paths([
        (
            "direct (non-meshed pods)",
            ("plain", "outsider"),
            format!("{}:{HTTP_PORT}", direct_a.ipv4()),
        ),
        (
            "meshed pod to meshed pod (L4)",
            ("mesh", "client-a"),
            format!("{}:{HTTP_PORT}", server_a.ipv4()),
        ),
        (
            "meshed pod to a Service with an HTTPRoute, its endpoint on the node: L7 proxy",
            ("mesh", "client-a"),
            format!("{SERVICE_IP}:80"),
        ),
    ]))
}

/// One run of every path: `--requests` requests one at a time on one connection.
pub(super) fn one_run(
    tb: &Testbed,
    args: &BenchArgs,
    workload: &str,
    paths: &Paths,
    runs: &mut Runs,
) -> anyhow::Result<()> {
    for ((_, from, target), runs) in paths.0.iter().zip(&mut runs.0) {
        let (out, cpu) = keep_alive_run(tb, args, workload, *from, target)?;
        runs.record(&out, cpu * 10_000.0 / args.requests as f64)?;
    }
    Ok(())
}

pub(super) fn section(out: &mut String, paths: &Paths, runs: &Runs) {
    out.push_str(
        "\n### Same node: 1 KiB keep-alive HTTP/1.1, concurrency 1 (closed loop), client and server on node1\n\n\
         Both meshed paths are handed from the agent's outbound to its inbound side in process, the L7 proxy's pooled connection too (docs/hbone.md, \"Between pods of one node\"), unless the header above names `NODEMESH_SAME_NODE_HBONE` (the agents' `--same-node-hbone`: HBONE, as between nodes).\n\n\
         | path | p50 µs | p99 µs | p50 ratio | p99 ratio | agent CPU s / 10k requests |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let summaries: Vec<_> = runs.0.iter().map(HttpRuns::summary).collect();
    let direct = &summaries[0];
    for ((name, _, _), summary) in paths.0.iter().zip(&summaries) {
        out.push_str(&format!(
            "| {name} | {} | {} | {:.3} | {:.3} | {} |\n",
            summary.p50.cell(1),
            summary.p99.cell(1),
            summary.p50.median() / direct.p50.median(),
            summary.p99.median() / direct.p99.median(),
            summary.cpu.cell(2),
        ));
    }
    let added = |i: usize| summaries[i].p50.median() - direct.p50.median();
    out.push_str(&format!(
        "\nAdded p50 latency over direct on the same node: {:.1} µs meshed (L4), {:.1} µs through the L7 proxy.\n",
        added(1),
        added(2)
    ));
}
