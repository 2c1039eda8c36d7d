//! One repetition of every scenario, in the order the report lists them, recorded into
//! [`Results`].

use std::time::{Duration, Instant};

use anyhow::Context;
use nodemesh_testbed::{MeshCa, Pod, Testbed};

use super::{
    BANNER_DECLARED_IP, BANNER_DETECTED_IP, BANNER_OPAQUE_IP, BANNER_PORT, BANNER_READS, BenchArgs,
    ECHO_PORT, EXCLUDED_PORT, HTTP_PORT, OPAQUE_PORT,
    observe::{UsageRuns, Watch},
    probes::{
        agents_cpu_seconds, enrolment_latencies, h2load, http_bench, run_json, wait_proxy_idle,
    },
    setup::Bed,
    short_lived::{self, ShortLivedRuns},
    stats::{H2Run, HttpRuns, Issuance},
    zones::ZoneRuns,
};

const OUTSIDER: (&str, &str) = ("plain", "outsider");
const CLIENT: (&str, &str) = ("mesh", "client-a");

/// Every run's samples, by scenario.
pub(super) struct Results {
    pub(super) direct: Vec<f64>,
    pub(super) hooked: Vec<f64>,
    pub(super) short_lived: ShortLivedRuns,
    pub(super) closed_loop: Vec<HttpRuns>,
    /// Per offered load and path: (achieved rps, p50, p99, p999) per run.
    pub(super) open_loop: Vec<Vec<Vec<[f64; 4]>>>,
    pub(super) h2_direct: Vec<H2Run>,
    pub(super) h2_l7: Vec<H2Run>,
    pub(super) banner_direct: Vec<f64>,
    pub(super) banner_detected: Vec<f64>,
    pub(super) banner_declared: Vec<f64>,
    pub(super) banner_opaque: Vec<f64>,
    pub(super) bulk_direct: Vec<f64>,
    pub(super) bulk_plain: Vec<f64>,
    pub(super) bulk_meshed: Vec<f64>,
    pub(super) enrolment_ms: Vec<f64>,
    pub(super) issuance: Vec<Issuance>,
    pub(super) zones: ZoneRuns,
    pub(super) usage: UsageRuns,
}

impl Results {
    pub(super) fn new(args: &BenchArgs, http_paths: usize) -> Self {
        Self {
            direct: Vec::new(),
            hooked: Vec::new(),
            short_lived: ShortLivedRuns::default(),
            closed_loop: (0..http_paths).map(|_| HttpRuns::default()).collect(),
            open_loop: vec![vec![Vec::new(); http_paths]; args.loads.len()],
            h2_direct: Vec::new(),
            h2_l7: Vec::new(),
            banner_direct: Vec::new(),
            banner_detected: Vec::new(),
            banner_declared: Vec::new(),
            banner_opaque: Vec::new(),
            bulk_direct: Vec::new(),
            bulk_plain: Vec::new(),
            bulk_meshed: Vec::new(),
            enrolment_ms: Vec::new(),
            zones: ZoneRuns::default(),
            usage: UsageRuns::default(),
            issuance: [1, 8]
                .into_iter()
                .map(|concurrency| Issuance {
                    concurrency,
                    rates: Vec::new(),
                    p50_ms: Vec::new(),
                    p99_ms: Vec::new(),
                })
                .collect(),
        }
    }
}

/// Run `run` of every scenario.
pub(super) fn one_run(
    tb: &mut Testbed,
    args: &BenchArgs,
    bed: &Bed,
    ca: &MeshCa,
    run: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let workload = &bed.workload;
    let rate =
        |from: (&str, &str), to: &Pod, port: u16| connect_rate(tb, args, workload, from, to, port);
    results
        .direct
        .push(rate(OUTSIDER, &bed.direct_a, ECHO_PORT)?);
    results
        .hooked
        .push(rate(CLIENT, &bed.direct_a, EXCLUDED_PORT)?);
    short_lived::one_run(
        tb,
        workload,
        args.connects,
        [&bed.direct_a, &bed.server_a],
        &mut results.short_lived,
        &mut results.usage,
        Watch::counting(),
    )?;
    closed_loop(tb, args, bed, results, Watch::counting())?;
    open_loop(tb, args, bed, results)?;
    http2(tb, args, bed, results, Watch::counting())?;
    banners(tb, bed, results)?;
    bulk(tb, args, bed, results, Watch::counting())?;
    issuance(tb, args, workload, ca, results)?;
    results
        .enrolment_ms
        .extend(enrolment_latencies(tb, run, args.enrolments)?);
    // The proxy finishes captured connections asynchronously: let them drain so runs do
    // not overlap.
    wait_proxy_idle(tb, Duration::from_secs(10))?;
    Ok(())
}

/// The request paths alone (`--paths-only`): keep-alive HTTP/1.1, HTTP/2 through L7 and
/// bulk, each watched as `watch` says.
pub(super) fn paths_run(
    tb: &mut Testbed,
    args: &BenchArgs,
    bed: &Bed,
    results: &mut Results,
    watch: Watch,
) -> anyhow::Result<()> {
    closed_loop(tb, args, bed, results, watch)?;
    http2(tb, args, bed, results, watch)?;
    bulk(tb, args, bed, results, watch)?;
    wait_proxy_idle(tb, Duration::from_secs(10))?;
    Ok(())
}

/// Requests per cell of the zone scenario (it has nine).
pub(super) fn zone_requests(args: &BenchArgs) -> u64 {
    (args.requests / 4).max(100)
}

/// connect() + close() per second from `from` to `to:port`.
fn connect_rate(
    tb: &Testbed,
    args: &BenchArgs,
    workload: &str,
    from: (&str, &str),
    to: &Pod,
    port: u16,
) -> anyhow::Result<f64> {
    let target = format!("{}:{port}", to.ipv4());
    let out = run_json(
        tb,
        from,
        workload,
        &[
            "connect-loop",
            "--target",
            &target,
            "--count",
            &args.connects.to_string(),
        ],
    )?;
    let per_connect_ns = out["per_connect_ns"].as_f64().context("per_connect_ns")?;
    Ok(1e9 / per_connect_ns)
}

/// The keep-alive HTTP/1.1 paths at concurrency 1, with the agents' CPU time.
fn closed_loop(
    tb: &Testbed,
    args: &BenchArgs,
    bed: &Bed,
    results: &mut Results,
    watch: Watch,
) -> anyhow::Result<()> {
    for ((path, from, target), runs) in bed.http_paths.iter().zip(&mut results.closed_loop) {
        let scenario = format!("keep-alive HTTP/1.1, {}", path.short());
        let (out, cpu) = watch.measure(
            tb,
            &mut results.usage,
            (&scenario, *from != OUTSIDER),
            ("request", args.requests as f64),
            || keep_alive_run(tb, args, &bed.workload, *from, target),
        )?;
        runs.record(&out, cpu * 10_000.0 / args.requests as f64)
            .with_context(|| format!("{path:?}"))?;
    }
    Ok(())
}

/// `--requests` keep-alive HTTP/1.1 requests one at a time from the pod `from` to `target`
/// (`http-bench`): its summary, and the CPU seconds both agents spent meanwhile.
pub(super) fn keep_alive_run(
    tb: &Testbed,
    args: &BenchArgs,
    workload: &str,
    from: (&str, &str),
    target: &str,
) -> anyhow::Result<(serde_json::Value, f64)> {
    let cpu_before = agents_cpu_seconds(tb)?;
    let out = http_bench(tb, from, workload, target, args.requests, 1)?;
    Ok((out, agents_cpu_seconds(tb)? - cpu_before))
}

/// The same paths at each fixed offered load.
fn open_loop(
    tb: &Testbed,
    args: &BenchArgs,
    bed: &Bed,
    results: &mut Results,
) -> anyhow::Result<()> {
    for (load_index, load) in args.loads.iter().enumerate() {
        for (path, (_, from, target)) in bed.http_paths.iter().enumerate() {
            let out = run_json(
                tb,
                *from,
                &bed.workload,
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
            results.open_loop[load_index][path].push([
                field("achieved_rps")?,
                field("p50_us")?,
                field("p99_us")?,
                field("p999_us")?,
            ]);
        }
    }
    Ok(())
}

/// Time to a server's banner, direct and through the three banner Services.
fn banners(tb: &Testbed, bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    for (samples, from, target) in [
        (
            &mut results.banner_direct,
            OUTSIDER,
            format!("{}:{BANNER_PORT}", bed.direct_b.ipv4()),
        ),
        (
            &mut results.banner_detected,
            CLIENT,
            format!("{BANNER_DETECTED_IP}:80"),
        ),
        (
            &mut results.banner_declared,
            CLIENT,
            format!("{BANNER_DECLARED_IP}:80"),
        ),
        (
            &mut results.banner_opaque,
            CLIENT,
            format!("{BANNER_OPAQUE_IP}:{OPAQUE_PORT}"),
        ),
    ] {
        for _ in 0..BANNER_READS {
            let out = run_json(
                tb,
                from,
                &bed.workload,
                &["read-banner", "--target", &target],
            )?;
            samples.push(out["banner_ms"].as_f64().context("banner_ms")?);
        }
    }
    Ok(())
}

/// h2load, direct and through the L7 proxy.
fn http2(
    tb: &Testbed,
    args: &BenchArgs,
    bed: &Bed,
    results: &mut Results,
    watch: Watch,
) -> anyhow::Result<()> {
    let direct_target = format!("{}:{HTTP_PORT}", bed.direct_b.ipv4());
    for (scenario, from, target, runs) in [
        (
            "HTTP/2, direct",
            OUTSIDER,
            direct_target.as_str(),
            &mut results.h2_direct,
        ),
        (
            "HTTP/2, L7 + HBONE mTLS",
            CLIENT,
            bed.l7_target.as_str(),
            &mut results.h2_l7,
        ),
    ] {
        runs.push(watch.measure(
            tb,
            &mut results.usage,
            (scenario, from != OUTSIDER),
            ("request", args.requests as f64),
            || h2load(tb, from, target, args.requests),
        )?);
    }
    Ok(())
}

/// One connection echoing `--bulk-mib` MiB: direct, through the source's proxy alone (plain
/// TCP to a non-meshed server: the cost of a proxy without TLS) and over HBONE.
fn bulk(
    tb: &Testbed,
    args: &BenchArgs,
    bed: &Bed,
    results: &mut Results,
    watch: Watch,
) -> anyhow::Result<()> {
    for (scenario, from, to, runs) in [
        (
            "bulk, direct",
            OUTSIDER,
            &bed.direct_b,
            &mut results.bulk_direct,
        ),
        (
            "bulk, L4, no mTLS",
            CLIENT,
            &bed.direct_b,
            &mut results.bulk_plain,
        ),
        (
            "bulk, HBONE mTLS",
            CLIENT,
            &bed.server_b,
            &mut results.bulk_meshed,
        ),
    ] {
        runs.push(watch.measure(
            tb,
            &mut results.usage,
            (scenario, from != OUTSIDER),
            ("MiB", args.bulk_mib as f64),
            || bulk_rate(tb, args, &bed.workload, from, to),
        )?);
    }
    Ok(())
}

/// MiB/s of one connection echoing `--bulk-mib` MiB from `from` to `to`.
fn bulk_rate(
    tb: &Testbed,
    args: &BenchArgs,
    workload: &str,
    from: (&str, &str),
    to: &Pod,
) -> anyhow::Result<f64> {
    let bulk_bytes = (args.bulk_mib * 1024 * 1024).to_string();
    let bulk_target = format!("{}:{ECHO_PORT}", to.ipv4());
    let started = Instant::now();
    run_json(
        tb,
        from,
        workload,
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
}

/// Certificates per second from the CA at each level of requests in flight.
fn issuance(
    tb: &Testbed,
    args: &BenchArgs,
    workload: &str,
    ca: &MeshCa,
    results: &mut Results,
) -> anyhow::Result<()> {
    for level in &mut results.issuance {
        let out = run_json(
            tb,
            ("plain", "outsider"),
            workload,
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
    Ok(())
}
