//! DNS answered in the pod vs by the cluster's resolver (issue 20). dnsmasq plays kube-dns in
//! `plain/direct-b`, on the other node as kube-dns usually is: it knows the Service
//! `bench-web.mesh.svc.cluster.local` (which the agents know too), `example.test`, and
//! nothing else under `cluster.local` (NXDOMAIN, as kube-dns). The workload's `dns-load`
//! asks one query at a time on a connected socket, as the C library does, from the
//! non-meshed `plain/outsider` (direct) and from the meshed `mesh/client-a`, both on node1,
//! to the same resolver address. Then one `curl` per name with a pod's resolv.conf
//! (`ndots:5`, the namespace's search path), counting the queries the resolver logs.

use std::{path::Path, process::Command};

use anyhow::Context;
use nodemesh_testbed::{Pod, Testbed};

use super::stats::Samples;

/// What the resolver answers for the Service name (the L7 Service's ClusterIP).
const SERVICE: &str = "bench-web";
const SERVICE_NAME: &str = "bench-web.mesh.svc.cluster.local";
const EXTERNAL_NAME: &str = "example.test";
const SEARCH: &str = "search mesh.svc.cluster.local svc.cluster.local cluster.local";

/// Latency with one query in flight, per (name, path) and run.
pub(super) struct DnsResults {
    /// [service direct, service meshed, external direct, external meshed]: (p50, p99) µs.
    latencies: [Vec<(f64, f64)>; 4],
    /// Queries the resolver saw for one curl: [(web direct, web meshed), (external ...)].
    seen: [(usize, usize); 2],
}

/// Starts the resolver in `resolver_pod`; returns its query log.
pub(super) fn start_resolver(
    tb: &Testbed,
    resolver_pod: &Pod,
) -> anyhow::Result<std::path::PathBuf> {
    let log = tb.log_dir().join("bench-dnsmasq.log");
    let service = format!("--address=/{SERVICE_NAME}/{}", super::L7_SERVICE_IP);
    let external = format!("--address=/{EXTERNAL_NAME}/192.0.2.7");
    tb.start_dnsmasq(
        resolver_pod,
        &log,
        &[
            "--cache-size=1000",
            &service,
            &external,
            "--address=/cluster.local/",
        ],
    )?;
    Ok(log)
}

pub(super) fn measure(
    tb: &Testbed,
    resolver_pod: &Pod,
    log: &Path,
    runs: usize,
) -> anyhow::Result<DnsResults> {
    let resolver = resolver_pod.ipv4().to_string();
    let outsider = tb.pod("plain", "outsider").clone();
    let client = tb.pod("mesh", "client-a").clone();
    let mut latencies: [Vec<(f64, f64)>; 4] = Default::default();
    for _ in 0..runs {
        for (i, (name, pod)) in [
            (SERVICE_NAME, &outsider),
            (SERVICE_NAME, &client),
            (EXTERNAL_NAME, &outsider),
            (EXTERNAL_NAME, &client),
        ]
        .into_iter()
        .enumerate()
        {
            latencies[i].push(dns_load(tb, pod, &resolver, name)?);
        }
    }
    let mut seen = [(0, 0); 2];
    for (i, name) in [SERVICE, EXTERNAL_NAME].into_iter().enumerate() {
        seen[i] = (
            queries_for_one_curl(tb, &outsider, &resolver, name, log)?,
            queries_for_one_curl(tb, &client, &resolver, name, log)?,
        );
    }
    Ok(DnsResults { latencies, seen })
}

/// The workload's `dns-load` asking `name` for 2 s: (p50, p99) µs.
fn dns_load(tb: &Testbed, pod: &Pod, resolver: &str, name: &str) -> anyhow::Result<(f64, f64)> {
    let workload = tb.workload_bin().display().to_string();
    let from = (pod.namespace(), pod.name());
    let out = super::probes::run_json(
        tb,
        from,
        &workload,
        &["dns-load", "--resolver", resolver, "--name", name],
    )?;
    let field = |key: &str| {
        out[key]
            .as_f64()
            .with_context(|| format!("no {key} in {out}"))
    };
    Ok((field("p50_us")?, field("p99_us")?))
}

/// The queries the resolver logs while `curl http://<name>/` runs in `pod` with a pod's
/// resolv.conf (bound over /etc/resolv.conf in a mount namespace of its own).
fn queries_for_one_curl(
    tb: &Testbed,
    pod: &Pod,
    resolver: &str,
    name: &str,
    log: &Path,
) -> anyhow::Result<usize> {
    let resolv = tb
        .log_dir()
        .join(format!("bench-resolv-{}.conf", pod.name()));
    std::fs::write(
        &resolv,
        format!("nameserver {resolver}\n{SEARCH}\noptions ndots:5\n"),
    )?;
    let count = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" query["))
            .count()
    };
    let before = count();
    let mut curl = Command::new("unshare");
    curl.args([
        "--mount",
        "sh",
        "-c",
        &format!(
            "mount --bind {} /etc/resolv.conf && curl -s -o /dev/null --max-time 2 http://{name}/; true",
            resolv.display()
        ),
    ]);
    tb.run_in_pod(pod, curl)?;
    // dnsmasq writes each query's line as it answers it, before curl gets the answer.
    Ok(count() - before)
}

pub(super) fn section(out: &mut String, results: DnsResults) {
    let [
        service_direct,
        service_meshed,
        external_direct,
        external_meshed,
    ] = results.latencies.map(|runs| {
        let (p50, p99): (Vec<f64>, Vec<f64>) = runs.into_iter().unzip();
        (Samples(p50), Samples(p99))
    });
    out.push_str(
        "\n### DNS: answered in the pod vs by the cluster's resolver (one query at a time for 2 s per run, connected socket)\n\n\
         The resolver is dnsmasq in a non-meshed pod on the other node, playing kube-dns; the clients are on node1.\n\n\
         | name | path | p50 µs | p99 µs | p50 ratio to direct |\n|---|---|---:|---:|---:|\n",
    );
    for (name, direct, meshed, how) in [
        (
            SERVICE_NAME,
            &service_direct,
            &service_meshed,
            "meshed pod: answered by the agent in the pod",
        ),
        (
            EXTERNAL_NAME,
            &external_direct,
            &external_meshed,
            "meshed pod: forwarded by the agent from the pod",
        ),
    ] {
        out.push_str(&format!(
            "| {name} | non-meshed pod to the resolver (direct) | {} | {} | 1.000 |\n| {name} | {how} | {} | {} | {:.3} |\n",
            direct.0.cell(0),
            direct.1.cell(0),
            meshed.0.cell(0),
            meshed.1.cell(0),
            meshed.0.median() / direct.0.median(),
        ));
    }
    let [
        (service_direct, service_meshed),
        (external_direct, external_meshed),
    ] = results.seen;
    out.push_str(&format!(
        "\nQueries the resolver saw for one `curl http://<name>/` with a pod's resolv.conf (`ndots:5`, search path `mesh.svc.cluster.local svc.cluster.local cluster.local`; A and AAAA):\n\n\
         | name | non-meshed pod | meshed pod |\n|---|---:|---:|\n\
         | {SERVICE} (a Service in the pod's namespace) | {service_direct} | {service_meshed} |\n\
         | {EXTERNAL_NAME} (outside the cluster) | {external_direct} | {external_meshed} |\n"
    ));
}
