//! `cargo xtask bench`: what capture costs, measured against direct traffic in the same run,
//! on the same testbed, with the same programs. Prints a markdown report; `--write` also
//! replaces the generated section of docs/benchmarks.md.
//!
//! Direct traffic goes from the non-meshed pod `plain/outsider` to servers in non-meshed pods
//! on the same nodes as the meshed servers (`plain/direct-a` on node1, `plain/direct-b` on
//! node2): traffic to a meshed pod is captured at the destination too, so only a destination
//! outside the mesh gives a direct baseline.
//!
//! Scenarios (each repeated `--runs` times; the report gives the median and the spread):
//! - connect()+close() rate from a non-meshed pod vs a meshed pod to a port excluded from
//!   capture (the hook runs its whole decision but passes: the hook's own cost).
//! - Short-lived connections end to end: connect() + 64-byte echo + close() from a non-meshed
//!   pod vs a meshed pod whose connections are captured and proxied. (A captured connect()
//!   alone completes against the in-pod listener and says nothing about the proxy.)
//! - 1 KiB keep-alive HTTP/1.1 request latency, cross-node, from a non-meshed pod (direct) vs
//!   a meshed pod: to a non-meshed pod (L4 without mTLS: the source's proxy relays plain
//!   TCP), to a meshed pod's address (L4: both node proxies relay bytes over HBONE mutual
//!   TLS) and to a Service with an HTTPRoute (L7: the client's node proxy parses, routes and
//!   balances every request); with the agents' CPU time per 10k requests.
//! - HTTP/2 (h2load, prior knowledge): one connection with 10 concurrent streams, requests/s
//!   and per-request latency from h2load's log, direct vs through the L7 proxy.
//! - Server-first protocols: time from connect() to a server's banner when the client sends
//!   nothing, direct vs through a Service port without `appProtocol` (protocol detection
//!   waits its bounded time) vs one declared `tcp` (no detection): detection's added delay.
//! - Open-loop HTTP/1.1 at fixed offered loads (`--loads`, 16 keep-alive connections,
//!   wrk2-style: latency from when each request was due), the same four paths: achieved
//!   rate and p50/p99/p999.
//! - Bulk: one connection echoing `--bulk-mib` MiB cross-node, direct vs HBONE mTLS.
//! - Agent memory (RSS) idle, with 100 enrolled pods on a node, and holding 10,000 idle
//!   proxied connections from one pod to a pod on the other node.
//! - Enrolment: a pod appears on node1 (cgroup, sandbox process, then its manifest with a
//!   podIP, in the order the kubelet and the API server produce them); the time until the
//!   agent's admin API lists it as enrolled, polled every millisecond (an upper bound).
//! - CA issuance: certificates signed per second by `nodemesh ca serve` with 1 and 8 requests
//!   in flight, each as an agent makes it (new key pair, CSR, TLS connection, POST).
//!
//! The testbed runs the nodemesh CA as a pod, so meshed-to-meshed traffic is what users get:
//! mutual TLS through the source and destination proxies.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nodemesh_testbed::{AgentOptions, ClusterMode, Testbed};

use crate::plot;
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const BANNER_PORT: u16 = 2525;
/// Services in front of server-b's banner server: detected, and declared `appProtocol: tcp`.
const BANNER_DETECTED_IP: &str = "198.18.201.20";
const BANNER_DECLARED_IP: &str = "198.18.201.21";
/// Banner reads per run and path.
const BANNER_READS: usize = 20;
/// The Service (with an HTTPRoute) in front of server-b that the L7 scenarios use.
const L7_SERVICE_IP: &str = "198.18.201.10";
const L7_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bench-web, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: bench-web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-bench, value: l7}]}
      backendRefs: [{name: bench-web, port: 80}]
";
const ECHO_PORT: u16 = 7000;
const EXCLUDED_PORT: u16 = 7001;
const REPORT_START: &str = "<!-- bench:start -->";
const REPORT_END: &str = "<!-- bench:end -->";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Repetitions of every scenario.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// connect()+close() pairs per run.
    #[arg(long, default_value_t = 20_000)]
    connects: u64,
    /// HTTP requests per run.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// MiB echoed by the bulk transfer per run.
    #[arg(long, default_value_t = 256)]
    bulk_mib: u64,
    /// Pods added (and enrolled) per run.
    #[arg(long, default_value_t = 20)]
    enrolments: usize,
    /// Certificate requests per run and concurrency level.
    #[arg(long, default_value_t = 300)]
    ca_requests: usize,
    /// Offered loads (requests/s) of the open-loop runs, each for `--load-seconds`.
    #[arg(long, value_delimiter = ',', default_value = "1000,3000")]
    loads: Vec<u64>,
    #[arg(long, default_value_t = 3)]
    load_seconds: u64,
    /// Idle connections held for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Replace the generated section of docs/benchmarks.md with this run's report.
    #[arg(long)]
    write: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let report = crate::with_testbed("nmbench", true, ClusterMode::Manifests, |tb| {
        measure(tb, args)
    })?;
    println!("{report}");
    if args.write {
        write_report(&report)?;
    }
    Ok(())
}

struct Samples(Vec<f64>);

/// A path of the keep-alive HTTP/1.1 scenarios.
#[derive(Clone, Copy, Debug)]
enum HttpPath {
    Direct,
    PlainL4,
    MtlsL4,
    L7,
}

impl HttpPath {
    fn description(self) -> &'static str {
        match self {
            Self::Direct => "direct (non-meshed pods)",
            Self::PlainL4 => {
                "meshed pod to non-meshed pod: the source's proxy only, plain TCP (L4, no mTLS)"
            }
            Self::MtlsL4 => "meshed pod to meshed pod: both node proxies, HBONE mTLS (L4)",
            Self::L7 => {
                "meshed pod to a Service with an HTTPRoute: L7 proxy (parse, route, balance) + HBONE mTLS"
            }
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::PlainL4 => "L4, no mTLS",
            Self::MtlsL4 => "L4, HBONE mTLS",
            Self::L7 => "L7, HTTPRoute + HBONE mTLS",
        }
    }
}

/// The closed-loop runs of one path.
#[derive(Default)]
struct HttpRuns {
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    rps: Vec<f64>,
    cpu_per_10k: Vec<f64>,
    /// The last run's latency distribution: (quantile, µs).
    last_cdf: Vec<(f64, f64)>,
}

impl HttpRuns {
    fn record(&mut self, out: &Value, cpu_per_10k: f64) -> anyhow::Result<()> {
        let field = |name: &str| out[name].as_f64().with_context(|| name.to_owned());
        self.p50.push(field("p50_us")?);
        self.p99.push(field("p99_us")?);
        self.p999.push(field("p999_us")?);
        self.rps.push(field("rps")?);
        self.cpu_per_10k.push(cpu_per_10k);
        self.last_cdf = out["cdf_us"]
            .as_array()
            .context("cdf_us")?
            .iter()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect();
        Ok(())
    }

    fn summary(&self) -> HttpSummary {
        HttpSummary {
            p50: Samples(self.p50.clone()),
            p99: Samples(self.p99.clone()),
            p999: Samples(self.p999.clone()),
            rps: Samples(self.rps.clone()),
            cpu: Samples(self.cpu_per_10k.clone()),
        }
    }
}

struct HttpSummary {
    p50: Samples,
    p99: Samples,
    p999: Samples,
    rps: Samples,
    cpu: Samples,
}

/// CA issuance samples at one level of requests in flight.
struct Issuance {
    concurrency: usize,
    rates: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
}

impl Samples {
    fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
    /// "median (min–max)" with `decimals` decimals.
    fn cell(&self, decimals: usize) -> String {
        format!("{:.*} ({})", decimals, self.median(), self.spread())
    }

    fn spread(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.1}–{max:.1}")
    }
}

fn measure(tb: &mut Testbed, args: &BenchArgs) -> anyhow::Result<String> {
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 24 * 3600)?;
    for node in ["node1", "node2"] {
        let mut extra_args = vec![
            "--exclude-port".into(),
            EXCLUDED_PORT.to_string(),
            // The memory scenario holds `--idle-connections` from one pod.
            "--max-connections-per-pod".into(),
            (args.idle_connections + 1000).to_string(),
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
    let workload = tb.workload_bin().display().to_string();
    // Meshed servers, and the same servers in non-meshed pods on the same nodes: traffic to a
    // meshed pod is captured at the destination too (inbound capture), so a direct baseline
    // needs a destination outside the mesh.
    let server_a = tb.pod("mesh", "server-a").clone();
    let server_b = tb.pod("mesh", "server-b").clone();
    let direct_a = tb.add_pod("node1", nodemesh_testbed::PodSpec::new("plain", "direct-a"))?;
    let direct_b = tb.add_pod("node2", nodemesh_testbed::PodSpec::new("plain", "direct-b"))?;
    for pod in [&server_a, &direct_a] {
        let mut echo = Command::new(&workload);
        echo.args([
            "echo-server",
            "--ports",
            &format!("{ECHO_PORT},{EXCLUDED_PORT}"),
        ]);
        tb.spawn_in_pod(pod, echo)?.detach();
        tb.wait_listening(pod, ECHO_PORT)?;
        tb.wait_listening(pod, EXCLUDED_PORT)?;
    }
    for pod in [&server_b, &direct_b] {
        let mut http = Command::new(&workload);
        http.args([
            "http-server",
            "--port",
            &HTTP_PORT.to_string(),
            "--body-bytes",
            "1024",
        ]);
        tb.spawn_in_pod(pod, http)?.detach();
        let mut bulk_echo = Command::new(&workload);
        bulk_echo.args(["echo-server", "--ports", &ECHO_PORT.to_string()]);
        tb.spawn_in_pod(pod, bulk_echo)?.detach();
        tb.wait_listening(pod, ECHO_PORT)?;
        tb.wait_listening(pod, HTTP_PORT)?;
    }
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
        &[(&server_b, false)],
    );
    tb.apply_object("endpointslice-bench-web.yaml", &slice)?;
    for pod in [&server_b, &direct_b] {
        let mut banner = Command::new(&workload);
        banner.args(["banner-server", "--port", &BANNER_PORT.to_string()]);
        tb.spawn_in_pod(pod, banner)?.detach();
        tb.wait_listening(pod, BANNER_PORT)?;
    }
    for (name, ip, app_protocol) in [
        ("bench-banner", BANNER_DETECTED_IP, None),
        ("bench-banner-tcp", BANNER_DECLARED_IP, Some("tcp")),
    ] {
        let mut service =
            nodemesh_testbed::cluster_state::service_object("mesh", name, ip, 80, "banner");
        if let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            ports[0].app_protocol = app_protocol.map(str::to_owned);
        }
        tb.apply_object(&format!("service-{name}.yaml"), &service)?;
        let slice = nodemesh_testbed::cluster_state::endpoint_slice_object(
            name,
            "banner",
            BANNER_PORT,
            &[(&server_b, false)],
        );
        tb.apply_object(&format!("endpointslice-{name}.yaml"), &slice)?;
    }
    let route: serde_yaml::Value = serde_yaml::from_str(L7_ROUTE)?;
    tb.apply_object("httproute-bench-web.yaml", &route)?;
    nodemesh_testbed::wait_until(Duration::from_secs(10), "L7 Service and route", || {
        let dump = tb.admin_json("node1", "/config_dump")?;
        Ok(dump["http_routes"].as_array().map(Vec::len) == Some(1)
            && Testbed::workload_services(&dump).len() == 3)
    })?;
    let l7_target = format!("{L7_SERVICE_IP}:80");
    let idle_rss = [agent_rss_mib(tb, "node1")?, agent_rss_mib(tb, "node2")?];
    // First, so that a failure here costs little: the agents' memory with 100 pods and with
    // many idle connections; it puts the testbed back as it was.
    eprintln!(
        "bench: memory with 100 pods and {} idle connections",
        args.idle_connections
    );
    let memory = memory(tb, &workload, args.idle_connections)?;

    let connect_rate = |tb: &Testbed,
                        from: (&str, &str),
                        to: &nodemesh_testbed::Pod,
                        port: u16,
                        echo_bytes: u16|
     -> anyhow::Result<f64> {
        let target = format!("{}:{port}", to.ipv4());
        let echo_bytes = echo_bytes.to_string();
        let out = run_json(
            tb,
            from,
            &workload,
            &[
                "connect-loop",
                "--target",
                &target,
                "--count",
                &args.connects.to_string(),
                "--echo-bytes",
                &echo_bytes,
            ],
        )?;
        let per_connect_ns = out["per_connect_ns"].as_f64().context("per_connect_ns")?;
        Ok(1e9 / per_connect_ns)
    };
    let (mut direct, mut hooked) = (Vec::new(), Vec::new());
    let (mut direct_tx, mut captured_tx) = (Vec::new(), Vec::new());
    // The keep-alive HTTP/1.1 paths, each from its client pod to its target.
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
    let mut closed_loop: Vec<HttpRuns> = http_paths.iter().map(|_| HttpRuns::default()).collect();
    // Per offered load and path: (achieved rps, p50, p99, p999) per run.
    let mut open_loop: Vec<Vec<Vec<[f64; 4]>>> =
        vec![vec![Vec::new(); http_paths.len()]; args.loads.len()];
    let (mut h2_direct, mut h2_l7) = (Vec::new(), Vec::new());
    let (mut banner_direct, mut banner_detected, mut banner_declared) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut bulk_direct, mut bulk_meshed) = (Vec::new(), Vec::new());
    let mut enrolment_ms: Vec<f64> = Vec::new();
    let mut issuance: Vec<Issuance> = [1, 8]
        .into_iter()
        .map(|concurrency| Issuance {
            concurrency,
            rates: Vec::new(),
            p50_ms: Vec::new(),
            p99_ms: Vec::new(),
        })
        .collect();
    let bulk_bytes = (args.bulk_mib * 1024 * 1024).to_string();
    let bulk =
        |tb: &Testbed, from: (&str, &str), to: &nodemesh_testbed::Pod| -> anyhow::Result<f64> {
            let bulk_target = format!("{}:{ECHO_PORT}", to.ipv4());
            let started = Instant::now();
            run_json(
                tb,
                from,
                &workload,
                &[
                    "echo-client",
                    "--target",
                    &bulk_target,
                    "--bytes",
                    &bulk_bytes,
                    "--connections",
                    "1",
                ],
            )?;
            Ok(args.bulk_mib as f64 / started.elapsed().as_secs_f64())
        };
    for run in 0..args.runs {
        eprintln!("bench run {}/{}", run + 1, args.runs);
        let outsider = ("plain", "outsider");
        let client = ("mesh", "client-a");
        direct.push(connect_rate(tb, outsider, &direct_a, ECHO_PORT, 0)?);
        hooked.push(connect_rate(tb, client, &direct_a, EXCLUDED_PORT, 0)?);
        direct_tx.push(connect_rate(tb, outsider, &direct_a, ECHO_PORT, 64)?);
        captured_tx.push(connect_rate(tb, client, &server_a, ECHO_PORT, 64)?);

        for ((path, from, target), runs) in http_paths.iter().zip(&mut closed_loop) {
            let cpu_before = agents_cpu_seconds(tb)?;
            let out = run_json(
                tb,
                *from,
                &workload,
                &[
                    "http-bench",
                    "--target",
                    target,
                    "--requests",
                    &args.requests.to_string(),
                    "--concurrency",
                    "1",
                ],
            )?;
            let cpu = agents_cpu_seconds(tb)? - cpu_before;
            runs.record(&out, cpu * 10_000.0 / args.requests as f64)
                .with_context(|| format!("{path:?}"))?;
        }
        for (load_index, load) in args.loads.iter().enumerate() {
            for (path, (_, from, target)) in http_paths.iter().enumerate() {
                let out = run_json(
                    tb,
                    *from,
                    &workload,
                    &[
                        "http-load",
                        "--target",
                        target,
                        "--rate",
                        &load.to_string(),
                        "--duration-ms",
                        &(args.load_seconds * 1000).to_string(),
                    ],
                )?;
                let field = |name: &str| out[name].as_f64().with_context(|| name.to_owned());
                open_loop[load_index][path].push([
                    field("achieved_rps")?,
                    field("p50_us")?,
                    field("p99_us")?,
                    field("p999_us")?,
                ]);
            }
        }
        h2_direct.push(h2load(
            tb,
            outsider,
            &format!("{}:{HTTP_PORT}", direct_b.ipv4()),
            args.requests,
        )?);
        h2_l7.push(h2load(tb, client, &l7_target, args.requests)?);
        for (samples, from, target) in [
            (
                &mut banner_direct,
                outsider,
                format!("{}:{BANNER_PORT}", direct_b.ipv4()),
            ),
            (
                &mut banner_detected,
                client,
                format!("{BANNER_DETECTED_IP}:80"),
            ),
            (
                &mut banner_declared,
                client,
                format!("{BANNER_DECLARED_IP}:80"),
            ),
        ] {
            for _ in 0..BANNER_READS {
                let out = run_json(tb, from, &workload, &["read-banner", "--target", &target])?;
                samples.push(out["banner_ms"].as_f64().context("banner_ms")?);
            }
        }
        bulk_direct.push(bulk(tb, outsider, &direct_b)?);
        bulk_meshed.push(bulk(tb, client, &server_b)?);
        for level in &mut issuance {
            let out = run_json(
                tb,
                ("plain", "outsider"),
                &workload,
                &[
                    "ca-load",
                    "--ca",
                    &ca.addr().to_string(),
                    "--trust-bundle",
                    &ca.trust_bundle().display().to_string(),
                    "--token-file",
                    &ca.token_file("node1").display().to_string(),
                    "--pod",
                    "mesh/client-a",
                    "--pod-uid",
                    tb.pod("mesh", "client-a").uid(),
                    "--requests",
                    &args.ca_requests.to_string(),
                    "--concurrency",
                    &level.concurrency.to_string(),
                ],
            )?;
            level
                .rates
                .push(out["per_second"].as_f64().context("per_second")?);
            level
                .p50_ms
                .push(out["p50_us"].as_f64().context("p50_us")? / 1000.0);
            level
                .p99_ms
                .push(out["p99_us"].as_f64().context("p99_us")? / 1000.0);
        }
        enrolment_ms.extend(enrolment_latencies(tb, run, args.enrolments)?);
        // The proxy finishes captured connections asynchronously: let them drain so runs do
        // not overlap.
        wait_proxy_idle(tb, Duration::from_secs(10))?;
    }
    let (direct, hooked) = (Samples(direct), Samples(hooked));
    let (direct_tx, captured_tx) = (Samples(direct_tx), Samples(captured_tx));
    let (bulk_direct, bulk_meshed) = (Samples(bulk_direct), Samples(bulk_meshed));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!(
        "Command: `cargo xtask bench --runs {} --connects {} --requests {} --bulk-mib {} --enrolments {} --ca-requests {}` (release build), kernel {}, {} CPUs. \
         Median of {} runs, range in brackets.\n\n",
        args.runs, args.connects, args.requests, args.bulk_mib, args.enrolments, args.ca_requests, kernel.trim(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), args.runs
    ));
    out.push_str("### Hook cost: connect() + close(), same node\n\n| source | connects/s | ratio to direct |\n|---|---:|---:|\n");
    for (name, samples, baseline) in [
        (
            "non-meshed pod to non-meshed pod (direct)",
            &direct,
            &direct,
        ),
        (
            "meshed pod to non-meshed pod, excluded port (hook runs its whole decision, passes)",
            &hooked,
            &direct,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | {:.3} |\n",
            samples.median(),
            samples.spread(),
            samples.median() / baseline.median()
        ));
    }
    out.push_str("\n### Short-lived connections: connect() + 64-byte echo + close(), same node\n\n| source | transactions/s | ratio to direct |\n|---|---:|---:|\n");
    for (name, samples) in [
        ("non-meshed pod to non-meshed pod (direct)", &direct_tx),
        (
            "meshed pod to meshed pod, captured (HBONE mTLS, same node)",
            &captured_tx,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | {:.3} |\n",
            samples.median(),
            samples.spread(),
            samples.median() / direct_tx.median()
        ));
    }
    let closed: Vec<HttpSummary> = closed_loop.iter().map(HttpRuns::summary).collect();
    let direct_http = &closed[0];
    out.push_str("\n### 1 KiB keep-alive HTTP/1.1, cross-node, concurrency 1 (closed loop)\n\n| path | p50 µs | p99 µs | p999 µs | p50 ratio | p99 ratio | p999 ratio | agent CPU s / 10k requests |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for ((path, _, _), summary) in http_paths.iter().zip(&closed) {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {} |\n",
            path.description(),
            summary.p50.cell(1),
            summary.p99.cell(1),
            summary.p999.cell(1),
            summary.p50.median() / direct_http.p50.median(),
            summary.p99.median() / direct_http.p99.median(),
            summary.p999.median() / direct_http.p999.median(),
            summary.cpu.cell(2),
        ));
    }
    out.push_str(&format!(
        "\nAdded p50 latency over direct: {:.1} µs through the source's proxy alone (no mTLS), {:.1} µs through both proxies with mTLS, {:.1} µs with L7 routing. CPU: both nodes' agents together, from /proc/<pid>/stat.\n",
        closed[1].p50.median() - direct_http.p50.median(),
        closed[2].p50.median() - direct_http.p50.median(),
        closed[3].p50.median() - direct_http.p50.median()
    ));
    out.push_str(&format!(
        "\n### Open loop: HTTP/1.1 at fixed offered loads, {} s each, 16 keep-alive connections, latency from when each request was due\n\n\
         | offered req/s | path | achieved req/s | p50 µs | p99 µs | p999 µs | p99 ratio to direct |\n|---:|---|---:|---:|---:|---:|---:|\n",
        args.load_seconds
    ));
    for (load, paths) in args.loads.iter().zip(&open_loop) {
        let column = |path: usize, i: usize| Samples(paths[path].iter().map(|r| r[i]).collect());
        let direct_p99 = column(0, 2).median();
        for (path, (name, _, _)) in http_paths.iter().enumerate() {
            let name = name.short();
            let (rps, p50, p99, p999) = (
                column(path, 0),
                column(path, 1),
                column(path, 2),
                column(path, 3),
            );
            out.push_str(&format!(
                "| {load} | {name} | {} | {} | {} | {} | {:.2} |\n",
                rps.cell(0),
                p50.cell(0),
                p99.cell(0),
                p999.cell(0),
                p99.median() / direct_p99
            ));
        }
    }
    out.push_str(&format!(
        "\n### HTTP/2 (h2load, prior knowledge), cross-node: {} requests on 1 connection, 10 streams in flight\n\n| path | requests/s | p50 µs | p99 µs | requests/s ratio | p50 ratio | p99 ratio |\n|---|---:|---:|---:|---:|---:|---:|\n",
        args.requests
    ));
    let h2_base = H2Samples::of(&h2_direct);
    for (name, runs) in [
        ("direct (non-meshed pods)", &h2_direct),
        (
            "meshed pod to a Service with an HTTPRoute: L7 proxy + HBONE mTLS",
            &h2_l7,
        ),
    ] {
        let s = H2Samples::of(runs);
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | {:.0} ({}) | {:.0} ({}) | {:.3} | {:.3} | {:.3} |\n",
            s.rps.median(),
            s.rps.spread(),
            s.p50.median(),
            s.p50.spread(),
            s.p99.median(),
            s.p99.spread(),
            s.rps.median() / h2_base.rps.median(),
            s.p50.median() / h2_base.p50.median(),
            s.p99.median() / h2_base.p99.median()
        ));
    }
    out.push_str(&format!(
        "\n### Server-first protocol: connect() → the server's banner, the client sending nothing, cross-node ({} reads per path)\n\n\
         | path | p50 ms | max ms | added max over direct ms |\n|---|---:|---:|---:|\n",
        BANNER_READS * args.runs
    ));
    let banner_max = |samples: &[f64]| samples.iter().copied().fold(0.0, f64::max);
    let banner_p50 = |samples: &[f64]| Samples(samples.to_vec()).median();
    for (name, samples) in [
        ("direct (non-meshed pods)", &banner_direct),
        (
            "meshed pod to a Service port without appProtocol (detection waits, then relays)",
            &banner_detected,
        ),
        (
            "meshed pod to a Service port with appProtocol: tcp (no detection)",
            &banner_declared,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.1} |\n",
            banner_p50(samples),
            banner_max(samples),
            banner_max(samples) - banner_max(&banner_direct)
        ));
    }
    out.push_str(&format!(
        "\n### Bulk: one connection echoing {} MiB, cross-node\n\n| path | MiB/s echoed | ratio to direct |\n|---|---:|---:|\n",
        args.bulk_mib
    ));
    for (name, samples) in [
        ("direct (non-meshed pods)", &bulk_direct),
        ("meshed pod to meshed pod: HBONE mTLS", &bulk_meshed),
    ] {
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | {:.3} |\n",
            samples.median(),
            samples.spread(),
            samples.median() / bulk_direct.median()
        ));
    }
    enrolment_ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        enrolment_ms
            [((enrolment_ms.len() as f64 * q).ceil() as usize).clamp(1, enrolment_ms.len()) - 1]
    };
    out.push_str(&format!(
        "\n### Enrolment: pod manifest written → agent lists the pod as enrolled ({} pods, admin API polled every 1 ms)\n\n\
         | p50 ms | p90 ms | max ms | target |\n|---:|---:|---:|---:|\n| {:.1} | {:.1} | {:.1} | ≤ 100 |\n",
        enrolment_ms.len(),
        at(0.5),
        at(0.9),
        at(1.0)
    ));
    out.push_str(&format!(
        "\n### Agent memory (RSS)\n\n| state | node1 agent MiB | node2 agent MiB |\n|---|---:|---:|\n\
         | idle, after start-up (3 meshed pods on node1, 2 on node2) | {:.1} | {:.1} |\n\
         | {} meshed pods enrolled on node1 | {:.1} | – |\n\
         | and {} idle proxied connections held from client-a (node1) to server-b (node2), HBONE mTLS | {:.1} | {:.1} |\n\
         \nPer idle connection: {:.1} KiB on the source node's agent, {:.1} KiB on the destination's. Target: ≤ 40 MiB with 100 pods and 10k idle connections.\n",
        idle_rss[0],
        idle_rss[1],
        memory.pods,
        memory.with_pods,
        memory.connections,
        memory.node1_with_connections,
        memory.node2_with_connections,
        (memory.node1_with_connections - memory.with_pods) * 1024.0 / memory.connections as f64,
        (memory.node2_with_connections - idle_rss[1]) * 1024.0 / memory.connections as f64,
    ));
    out.push_str(
        "\n### CA issuance: certificates signed by `nodemesh ca serve` (new key pair, CSR, TLS connection and POST per request)\n\n\
         | requests in flight | certificates/s | p50 ms | p99 ms |\n|---:|---:|---:|---:|\n",
    );
    for level in issuance {
        let concurrency = level.concurrency;
        let (rates, p50s, p99s) = (
            Samples(level.rates),
            Samples(level.p50_ms),
            Samples(level.p99_ms),
        );
        out.push_str(&format!(
            "| {concurrency} | {:.0} ({}) | {:.2} ({}) | {:.2} ({}) |\n",
            rates.median(),
            rates.spread(),
            p50s.median(),
            p50s.spread(),
            p99s.median(),
            p99s.spread()
        ));
    }
    let h2 = (H2Samples::of(&h2_direct), H2Samples::of(&h2_l7));
    let ratios = [
        ("connect(), hook passes", hooked.median() / direct.median()),
        (
            "short-lived connection, mTLS",
            captured_tx.median() / direct_tx.median(),
        ),
        (
            "HTTP/1.1 req/s, L4 (no mTLS)",
            closed[1].rps.median() / direct_http.rps.median(),
        ),
        (
            "HTTP/1.1 req/s, L4 mTLS",
            closed[2].rps.median() / direct_http.rps.median(),
        ),
        (
            "HTTP/1.1 req/s, L7 + mTLS",
            closed[3].rps.median() / direct_http.rps.median(),
        ),
        (
            "HTTP/2 req/s, L7 + mTLS",
            h2.1.rps.median() / h2.0.rps.median(),
        ),
        (
            "bulk MiB/s, mTLS",
            bulk_meshed.median() / bulk_direct.median(),
        ),
    ];
    let curves: Vec<plot::Curve> = http_paths
        .iter()
        .zip(&closed_loop)
        .map(|((path, _, _), runs)| plot::Curve {
            name: path.short().to_owned(),
            // Up to p99.9: the single slowest request would set the scale.
            points: runs
                .last_cdf
                .iter()
                .filter(|(q, _)| *q <= 0.999)
                .map(|&(q, us)| (us, q))
                .collect(),
        })
        .collect();
    let plots_dir = if args.write {
        crate::workspace_root().join("docs")
    } else {
        crate::target_dir().join("bench")
    };
    std::fs::create_dir_all(&plots_dir)?;
    plot::write(
        &plots_dir,
        "bench-latency-cdf",
        &plot::cdf(
            "1 KiB keep-alive HTTP/1.1 latency, cross-node (last run)",
            "latency (µs)",
            &curves,
        ),
    )?;
    plot::write(
        &plots_dir,
        "bench-throughput",
        &plot::ratio_bars(
            "Throughput through the mesh as a ratio to direct (median of runs)",
            &ratios
                .iter()
                .map(|(name, ratio)| ((*name).to_owned(), *ratio))
                .collect::<Vec<_>>(),
        ),
    )?;
    out.push_str(
        "\n### Plots\n\n![latency CDF](bench-latency-cdf.png)\n\n![throughput ratios](bench-throughput.png)\n",
    );
    Ok(out)
}

/// One h2load run: requests/s and per-request latency percentiles (µs).
struct H2Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

struct H2Samples {
    rps: Samples,
    p50: Samples,
    p99: Samples,
}

impl H2Samples {
    fn of(runs: &[H2Run]) -> Self {
        Self {
            rps: Samples(runs.iter().map(|r| r.rps).collect()),
            p50: Samples(runs.iter().map(|r| r.p50_us).collect()),
            p99: Samples(runs.iter().map(|r| r.p99_us).collect()),
        }
    }
}

/// `requests` HTTP/2 requests from `from` to `target` with h2load: one connection, 10
/// streams in flight. Latencies come from its per-request log (third column, µs).
fn h2load(tb: &Testbed, from: (&str, &str), target: &str, requests: u64) -> anyhow::Result<H2Run> {
    let pod = tb.pod(from.0, from.1).clone();
    let log = std::env::temp_dir().join(format!("{}-h2load-{}.log", tb.name(), from.1));
    let mut h2load = Command::new("h2load");
    h2load.args(["-n", &requests.to_string(), "-c", "1", "-m", "10"]);
    h2load.arg(format!("--log-file={}", log.display()));
    h2load.arg(format!("http://{target}/"));
    let output = tb.run_in_pod(&pod, h2load)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() || !stdout.contains(&format!("{requests} succeeded")) {
        bail!("h2load from {}/{} to {target}: {stdout}", from.0, from.1);
    }
    // "finished in 1.23s, 16260.16 req/s, 18.57MB/s"
    let rps = stdout
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.strip_suffix(" req/s"))
        .and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load's output: {stdout}"))?;
    let text = std::fs::read_to_string(&log).context("h2load's log")?;
    let _ = std::fs::remove_file(&log);
    let mut latencies: Vec<f64> = text
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .collect();
    if latencies.is_empty() {
        bail!("h2load's log has no latencies");
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    Ok(H2Run {
        rps,
        p50_us: at(0.5),
        p99_us: at(0.99),
    })
}

/// Adds `count` meshed pods to node1 one by one and measures how long each takes to show up
/// as enrolled, then removes them.
fn enrolment_latencies(tb: &mut Testbed, run: usize, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(count);
    for index in 0..count {
        let spec = nodemesh_testbed::PodSpec::new("mesh", &format!("enrol-{run}-{index}"));
        let pod = tb.add_pod("node1", spec)?;
        let written = Instant::now();
        let uid = pod.uid().to_owned();
        loop {
            let dump = tb.admin_json("node1", "/config_dump")?;
            let enrolled = dump["enrolled_pods"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["uid"] == uid.as_str());
            if enrolled {
                latencies.push(written.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if written.elapsed() > Duration::from_secs(10) {
                bail!("pod {} was not enrolled within 10 s", pod.key());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tb.remove_pod(&pod)?;
    }
    Ok(latencies)
}

/// Waits (`timeout` at most) until node1's proxy has closed every connection it opened.
fn wait_proxy_idle(tb: &Testbed, timeout: Duration) -> anyhow::Result<()> {
    nodemesh_testbed::wait_until(timeout, "node1's proxy idle", || {
        let stats = tb.admin_json("node1", "/stats")?;
        Ok(stats["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|s| s["opened"] == s["closed"]))
    })?;
    Ok(())
}

/// CPU time (user + system) both agents have used so far, in seconds.
fn agents_cpu_seconds(tb: &Testbed) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for node in ["node1", "node2"] {
        total += process_cpu_seconds(tb.agent_pid(node).context("agent pid")?)?;
    }
    Ok(total)
}

/// CPU time (user + system) the process `pid` has used so far, in seconds.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}

/// Resident memory of the agent of `node`, in MiB.
fn agent_rss_mib(tb: &Testbed, node: &str) -> anyhow::Result<f64> {
    Ok(tb.agent_rss_kib(node)? as f64 / 1024.0)
}

/// The agents' memory with 100 enrolled pods on node1, and with `connections` idle proxied
/// connections held from client-a (node1) to server-b (node2).
struct Memory {
    pods: usize,
    with_pods: f64,
    connections: usize,
    node1_with_connections: f64,
    node2_with_connections: f64,
}

fn memory(tb: &mut Testbed, workload: &str, connections: usize) -> anyhow::Result<Memory> {
    const PODS: usize = 100;
    let enrolled = |tb: &Testbed| -> nodemesh_testbed::Result<usize> {
        let dump = tb.admin_json("node1", "/config_dump")?;
        Ok(dump["enrolled_pods"].as_array().map_or(0, Vec::len))
    };
    let missing = PODS.saturating_sub(enrolled(tb)?);
    let mut added = Vec::with_capacity(missing);
    for index in 0..missing {
        let spec = nodemesh_testbed::PodSpec::new("mesh", &format!("mem-{index}"));
        added.push(tb.add_pod("node1", spec)?);
    }
    nodemesh_testbed::wait_until(
        Duration::from_secs(60),
        "100 pods enrolled on node1",
        || Ok(enrolled(tb)? >= PODS),
    )?;
    let with_pods = agent_rss_mib(tb, "node1")?;
    let report = tb.log_dir().join(format!("{}-flood.json", tb.name()));
    let _ = std::fs::remove_file(&report);
    let target = format!("{}:{ECHO_PORT}", tb.pod("mesh", "server-b").ipv4());
    let mut flood = Command::new(workload);
    flood
        .args(["flood", "--target", &target, "--connections"])
        .arg(connections.to_string())
        .arg("--report")
        .arg(&report)
        .args(["--hold-ms", "600000"]);
    let client = tb.pod("mesh", "client-a").clone();
    let process = tb.spawn_in_pod(&client, flood)?;
    nodemesh_testbed::wait_until(Duration::from_secs(300), "the idle connections", || {
        Ok(report.exists())
    })?;
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let established = summary["established"].as_u64().unwrap_or(0) as usize;
    if established != connections {
        eprintln!(
            "bench: asked for {connections} idle connections, holding {established}: {summary}"
        );
    }
    let memory = Memory {
        pods: PODS,
        with_pods,
        connections: established,
        node1_with_connections: agent_rss_mib(tb, "node1")?,
        node2_with_connections: agent_rss_mib(tb, "node2")?,
    };
    process.kill()?;
    // Back to the state the other scenarios expect: their pods gone, the proxies idle.
    for pod in &added {
        tb.remove_pod(pod)?;
    }
    wait_proxy_idle(tb, Duration::from_secs(60))?;
    Ok(memory)
}

fn run_json(
    tb: &Testbed,
    from: (&str, &str),
    workload: &str,
    args: &[&str],
) -> anyhow::Result<Value> {
    let pod = tb.pod(from.0, from.1).clone();
    let mut command = Command::new(workload);
    command.args(args);
    let output = tb.run_in_pod(&pod, command)?;
    if !output.status.success() {
        bail!(
            "{args:?} from {}/{} failed: {}",
            from.0,
            from.1,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("{args:?} printed {stdout:?}"))
}

fn write_report(report: &str) -> anyhow::Result<()> {
    replace_section("docs/benchmarks.md", REPORT_START, REPORT_END, report)
}

/// Replaces what lies between the markers `start` and `end` of the workspace file `path`.
pub fn replace_section(path: &str, start: &str, end: &str, report: &str) -> anyhow::Result<()> {
    let path = crate::workspace_root().join(path);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(from), Some(to)) = (text.find(start), text.find(end)) else {
        bail!("{} lacks the {start} / {end} markers", path.display());
    };
    let updated = format!("{}{start}\n{report}\n{}", &text[..from], &text[to..]);
    std::fs::write(&path, updated).with_context(|| format!("writing {}", path.display()))?;
    println!("updated {}", path.display());
    Ok(())
}
