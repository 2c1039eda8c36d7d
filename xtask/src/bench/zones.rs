//! The zone scenario: what zone-aware balancing costs and saves in latency when the other
//! zone is further away.
//!
//! node1 is zone-a, node2 zone-b (Node documents); Service `bench-zoned` has an HTTP server
//! on server-a (node1, the client's zone) and one on server-b (node2) that answers
//! `CROSS_ZONE_MS` later: the stand-in for the network delay between zones. (This
//! machine's kernel has neither `sch_netem` nor `sch_fq`, whose earliest-departure-time
//! pacing a tc program could use to delay packets, so the delay is added where the
//! packets arrive instead; a request to zone-b pays it exactly once, as it would a
//! cross-zone round trip.) client-a sends keep-alive HTTP/1.1 requests at several
//! concurrencies, with the Service's zone preference off (`nodemesh.io/zone-affinity: off`:
//! the latency-aware choice alone) and on (the default), and node1's
//! `nodemesh_zone_requests_total` says how many left the zone. The direct baseline is the
//! same client program from a non-meshed pod to a non-meshed server on node1, at the same
//! concurrency.

use std::time::Duration;

use anyhow::Context;
use nodemesh_testbed::{Pod, Testbed, cluster_state};
use serde_json::Value;

use super::{probes::http_bench, stats::Samples};

const ZONED_IP: &str = "198.18.201.30";
const ZONED_PORT: u16 = 8081;
/// What a request to the other zone costs more.
pub(super) const CROSS_ZONE_MS: u64 = 2;
pub(super) const CONCURRENCIES: [usize; 3] = [1, 4, 16];

/// One (preference, concurrency) cell over the runs.
#[derive(Default)]
pub(super) struct ZoneCell {
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// Share of requests that left zone-a.
    cross_zone: Vec<f64>,
}

/// Every run's cells: `direct[c]`, `cells[zoned as usize][c]`, by concurrency index.
#[derive(Default)]
pub(super) struct ZoneRuns {
    direct: [ZoneCell; 3],
    cells: [[ZoneCell; 3]; 2],
}

/// Starts the servers and publishes the zones and the Service (preference on).
pub(super) fn prepare(
    tb: &mut Testbed,
    workload: &str,
    [server_a, server_b, direct_a]: [&Pod; 3],
) -> anyhow::Result<()> {
    let port = ZONED_PORT.to_string();
    let delay = CROSS_ZONE_MS.to_string();
    for (pod, delay) in [(server_a, "0"), (server_b, delay.as_str()), (direct_a, "0")] {
        let args = [
            "http-server",
            "--port",
            &port,
            "--body-bytes",
            "1024",
            "--name",
            pod.name(),
            "--delay-ms",
            delay,
        ];
        let mut server = std::process::Command::new(workload);
        server.args(args);
        tb.spawn_in_pod(pod, server)?.detach();
        tb.wait_listening(pod, ZONED_PORT)?;
    }
    for (node, zone) in [("node1", "zone-a"), ("node2", "zone-b")] {
        let object: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": zone}},
        }))?;
        tb.apply_object(&format!("node-{node}.yaml"), &object)?;
    }
    let mut slice = cluster_state::endpoint_slice_object(
        "bench-zoned",
        "http",
        ZONED_PORT,
        &[(server_a, false), (server_b, false)],
    );
    cluster_state::set_endpoint_zones(&mut slice, &[Some("zone-a"), Some("zone-b")]);
    tb.apply_object("endpointslice-bench-zoned.yaml", &slice)?;
    set_preference(tb, true)
}

/// The Service with its zone preference on or off; waits until node1's agent has it.
fn set_preference(tb: &Testbed, on: bool) -> anyhow::Result<()> {
    let mut service = cluster_state::service_object("mesh", "bench-zoned", ZONED_IP, 80, "http");
    if let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        ports[0].app_protocol = Some("http".into());
    }
    if !on {
        service.metadata.annotations = Some(
            [("nodemesh.io/zone-affinity".to_owned(), "off".to_owned())]
                .into_iter()
                .collect(),
        );
    }
    tb.apply_object("service-bench-zoned.yaml", &service)?;
    let vip = format!("{ZONED_IP}:80");
    nodemesh_testbed::wait_until(Duration::from_secs(10), "the zoned Service", || {
        let dump = tb.admin_json("node1", "/config_dump")?;
        let port = Testbed::workload_services(&dump)
            .into_iter()
            .find(|s| s["virtual_address"] == vip.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        Ok(dump["zones"]["local_zone"] == "zone-a" && port["zone_preference"].is_object() == on)
    })?;
    Ok(())
}

/// node1's count of requests to Service endpoints: (all, out of the zone).
fn zone_requests(tb: &Testbed) -> anyhow::Result<(f64, f64)> {
    let (_, text) = tb.admin_get("node1", "/metrics")?;
    let mut counts = (0.0, 0.0);
    for line in text
        .lines()
        .filter(|l| l.starts_with("nodemesh_zone_requests_total{"))
    {
        let value: f64 = (line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("metric line {line:?}"))?;
        counts.0 += value;
        if line.contains("same_zone=\"false\"") {
            counts.1 += value;
        }
    }
    Ok(counts)
}

fn bench(
    tb: &Testbed,
    from: (&str, &str),
    workload: &str,
    target: &str,
    requests: u64,
    concurrency: usize,
) -> anyhow::Result<(f64, f64)> {
    let out = http_bench(tb, from, workload, target, requests, concurrency)?;
    let field = |name: &str| out[name].as_f64().with_context(|| name.to_owned());
    Ok((field("p50_us")?, field("p99_us")?))
}

/// One run: direct, then the Service with the preference off and on, at each concurrency.
pub(super) fn one_run(
    tb: &Testbed,
    workload: &str,
    direct_a: &Pod,
    requests: u64,
    runs: &mut ZoneRuns,
) -> anyhow::Result<()> {
    let direct = format!("{}:{ZONED_PORT}", direct_a.ipv4());
    for (c, concurrency) in CONCURRENCIES.into_iter().enumerate() {
        let (p50, p99) = bench(
            tb,
            ("plain", "outsider"),
            workload,
            &direct,
            requests,
            concurrency,
        )?;
        runs.direct[c].p50.push(p50);
        runs.direct[c].p99.push(p99);
    }
    let service = format!("{ZONED_IP}:80");
    for on in [false, true] {
        set_preference(tb, on)?;
        for (c, concurrency) in CONCURRENCIES.into_iter().enumerate() {
            let before = zone_requests(tb)?;
            let (p50, p99) = bench(
                tb,
                ("mesh", "client-a"),
                workload,
                &service,
                requests,
                concurrency,
            )?;
            let after = zone_requests(tb)?;
            let cell = &mut runs.cells[usize::from(on)][c];
            cell.p50.push(p50);
            cell.p99.push(p99);
            cell.cross_zone
                .push((after.1 - before.1) / (after.0 - before.0).max(1.0));
        }
    }
    Ok(())
}

/// The report's section.
pub(super) fn section(out: &mut String, requests: u64, runs: ZoneRuns) {
    out.push_str(&format!(
        "\n### Zones: keep-alive HTTP/1.1 to a Service with an endpoint in the client's zone and one in another zone {CROSS_ZONE_MS} ms further away\n\n\
         {requests} requests per cell; the direct baseline is a non-meshed client and server in the same zone at the same concurrency. \
         \"Left the zone\" is node1's `nodemesh_zone_requests_total` (bench/zones.rs says why the delay is at the server: no netem in this kernel).\n\n\
         | concurrency | zone preference | p50 µs | p99 µs | p50 / direct | p99 / direct | left the zone |\n|---:|---|---:|---:|---:|---:|---:|\n"
    ));
    let pct = |s: &Samples| format!("{:.1} % ({})", s.median() * 100.0, spread_pct(s));
    for (c, concurrency) in CONCURRENCIES.into_iter().enumerate() {
        let direct = &runs.direct[c];
        let (d50, d99) = (Samples(direct.p50.clone()), Samples(direct.p99.clone()));
        out.push_str(&format!(
            "| {concurrency} | direct | {} | {} | 1 | 1 | – |\n",
            d50.cell(0),
            d99.cell(0)
        ));
        for (on, name) in [(false, "off (latency only)"), (true, "on (default)")] {
            let cell = &runs.cells[usize::from(on)][c];
            let (p50, p99) = (Samples(cell.p50.clone()), Samples(cell.p99.clone()));
            out.push_str(&format!(
                "| {concurrency} | {name} | {} | {} | {:.2} | {:.2} | {} |\n",
                p50.cell(0),
                p99.cell(0),
                p50.median() / d50.median(),
                p99.median() / d99.median(),
                pct(&Samples(cell.cross_zone.clone())),
            ));
        }
    }
}

fn spread_pct(samples: &Samples) -> String {
    let min = samples.0.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.1}–{:.1}", min * 100.0, max * 100.0)
}
