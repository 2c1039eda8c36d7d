//! The markdown report and the plots, from every run's samples: one section per scenario,
//! in the order `scenarios.rs` runs them.

use super::{
    BANNER_READS, BenchArgs,
    probes::Memory,
    scenarios::Results,
    setup::Bed,
    stats::{H2Run, H2Samples, HttpPath, HttpRuns, HttpSummary, Issuance, Samples},
};
use crate::plot;

pub(super) fn render(
    args: &BenchArgs,
    bed: &Bed,
    results: Results,
    memory: &Memory,
    idle_rss: [f64; 2],
) -> anyhow::Result<String> {
    let Results {
        direct,
        hooked,
        short_lived,
        closed_loop,
        open_loop,
        h2_direct,
        h2_l7,
        banner_direct,
        banner_detected,
        banner_declared,
        banner_opaque,
        bulk_direct,
        bulk_plain,
        bulk_meshed,
        mut enrolment_ms,
        issuance,
        zones,
        usage,
    } = results;
    let (direct, hooked) = (Samples(direct), Samples(hooked));
    let bulk = [bulk_direct, bulk_plain, bulk_meshed].map(Samples);
    let mut out = header(args);
    hook_cost(&mut out, [&direct, &hooked]);
    super::short_lived::section(&mut out, args.connects, &short_lived);
    let closed = closed_loop_section(&mut out, bed, &closed_loop);
    open_loop_section(&mut out, args, bed, &open_loop);
    h2_section(&mut out, args, &h2_direct, &h2_l7);
    banner_section(
        &mut out,
        args,
        [
            &banner_direct,
            &banner_detected,
            &banner_declared,
            &banner_opaque,
        ],
    );
    bulk_section(&mut out, args, &bulk);
    super::zones::section(&mut out, super::scenarios::zone_requests(args), zones);
    enrolment_section(&mut out, &mut enrolment_ms);
    memory_section(&mut out, memory, idle_rss);
    issuance_section(&mut out, issuance);
    usage.sections(&mut out);
    let direct_http = &closed[0];
    let h2 = (H2Samples::of(&h2_direct), H2Samples::of(&h2_l7));
    let ratios = [
        ("connect(), hook passes", hooked.median() / direct.median()),
        (
            "short-lived connection, mTLS",
            Samples(short_lived.captured.rate.clone()).median()
                / Samples(short_lived.direct.rate.clone()).median(),
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
        ("bulk MiB/s, mTLS", bulk[2].median() / bulk[0].median()),
    ];
    plots(&mut out, args, bed, &closed_loop, &ratios)?;
    Ok(out)
}

/// The command, the kernel and the CPUs.
pub(super) fn header(args: &BenchArgs) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!(
        "Command: `cargo xtask bench --runs {} --connects {} --requests {} --bulk-mib {} --enrolments {} --ca-requests {}` (release build), kernel {}, {} CPUs. \
         Median of {} runs, range in brackets. The agents count their heap allocations \
         (the feature `count-allocations`: an uncontended atomic add per allocation).\n\n",
        args.runs, args.connects, args.requests, args.bulk_mib, args.enrolments, args.ca_requests, kernel.trim(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), args.runs
    ));
    if !args.agent_env.is_empty() {
        let env: Vec<String> = (args.agent_env.iter())
            .map(|(name, value)| format!("`{name}={value}`"))
            .collect();
        out.push_str(&format!("The agents ran with {}.\n\n", env.join(", ")));
    }
    if args.cpu_profile.is_some() {
        out.push_str(
            "These runs were sampled by perf (`--cpu-profile`), which slows the agents: take \
             timings from a run without it.\n\n",
        );
    }
    out
}

/// Hook cost: connect() + close() from a non-meshed pod and through a meshed pod's hook.
fn hook_cost(out: &mut String, [direct, hooked]: [&Samples; 2]) {
    out.push_str("### Hook cost: connect() + close(), same node\n\n| source | connects/s | ratio to direct |\n|---|---:|---:|\n");
    for (name, samples) in [
        ("non-meshed pod to non-meshed pod (direct)", direct),
        (
            "meshed pod to non-meshed pod, excluded port (hook runs its whole decision, passes)",
            hooked,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | {:.3} |\n",
            samples.median(),
            samples.spread(),
            samples.median() / direct.median()
        ));
    }
}

/// The report of a `--paths-only` run.
pub(super) fn paths_only(args: &BenchArgs, bed: &Bed, results: Results) -> String {
    let mut out = header(args);
    closed_loop_section(&mut out, bed, &results.closed_loop);
    h2_section(&mut out, args, &results.h2_direct, &results.h2_l7);
    bulk_section(
        &mut out,
        args,
        &[results.bulk_direct, results.bulk_plain, results.bulk_meshed].map(Samples),
    );
    results.usage.sections(&mut out);
    out
}

/// Keep-alive HTTP/1.1 at concurrency 1; returns each path's summary.
fn closed_loop_section(out: &mut String, bed: &Bed, closed_loop: &[HttpRuns]) -> Vec<HttpSummary> {
    let http_paths = &bed.http_paths;
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
    closed
}

/// HTTP/1.1 at fixed offered loads.
fn open_loop_section(
    out: &mut String,
    args: &BenchArgs,
    bed: &Bed,
    open_loop: &[Vec<Vec<[f64; 4]>>],
) {
    let http_paths = &bed.http_paths;
    out.push_str(&format!(
        "\n### Open loop: HTTP/1.1 at fixed offered loads, {} s each, 16 keep-alive connections, latency from when each request was due\n\n\
         | offered req/s | path | achieved req/s | p50 µs | p99 µs | p999 µs | p99 ratio to direct |\n|---:|---|---:|---:|---:|---:|---:|\n",
        args.load_seconds
    ));
    for (load, paths) in args.loads.iter().zip(open_loop) {
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
}

fn h2_section(out: &mut String, args: &BenchArgs, h2_direct: &[H2Run], h2_l7: &[H2Run]) {
    out.push_str(&format!(
        "\n### HTTP/2 (h2load, prior knowledge), cross-node: {} requests on 1 connection, 10 streams in flight\n\n| path | requests/s | p50 µs | p99 µs | requests/s ratio | p50 ratio | p99 ratio |\n|---|---:|---:|---:|---:|---:|---:|\n",
        args.requests
    ));
    let h2_base = H2Samples::of(h2_direct);
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
}

/// Server-first protocols: time to the banner.
fn banner_section(
    out: &mut String,
    args: &BenchArgs,
    [
        banner_direct,
        banner_detected,
        banner_declared,
        banner_opaque,
    ]: [&[f64]; 4],
) {
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
        (
            "meshed pod to a Service on port 3306 without appProtocol (an --opaque-ports port: no detection)",
            &banner_opaque,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.1} |\n",
            banner_p50(samples),
            banner_max(samples),
            banner_max(samples) - banner_max(banner_direct)
        ));
    }
}

/// Bulk echo over each path: direct, L4 without mTLS, HBONE mTLS.
fn bulk_section(out: &mut String, args: &BenchArgs, [direct, plain, meshed]: &[Samples; 3]) {
    out.push_str(&format!(
        "\n### Bulk: one connection echoing {} MiB, cross-node\n\n| path | MiB/s echoed | ratio to direct |\n|---|---:|---:|\n",
        args.bulk_mib
    ));
    for (path, samples) in [
        (HttpPath::Direct, direct),
        (HttpPath::PlainL4, plain),
        (HttpPath::MtlsL4, meshed),
    ] {
        out.push_str(&format!(
            "| {} | {:.0} ({}) | {:.3} |\n",
            path.description(),
            samples.median(),
            samples.spread(),
            samples.median() / direct.median()
        ));
    }
}

fn enrolment_section(out: &mut String, enrolment_ms: &mut [f64]) {
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
}

/// The report of a `--memory-only` run.
pub(super) fn memory_only(args: &BenchArgs, memory: &Memory, idle_rss: [f64; 2]) -> String {
    let mut out = header(args);
    memory_section(&mut out, memory, idle_rss);
    out
}

fn memory_section(out: &mut String, memory: &Memory, idle_rss: [f64; 2]) {
    out.push_str(&format!(
        "\n### Agent memory (RSS)\n\n| state | node1 agent MiB | node2 agent MiB |\n|---|---:|---:|\n\
         | idle, after start-up (3 meshed pods on node1, 2 on node2) | {:.1} | {:.1} |\n\
         | {} meshed pods enrolled on node1 | {:.1} | – |\n\
         | and {} idle proxied connections held from client-a (node1) to server-b (node2), HBONE mTLS | {:.1} | {:.1} |\n\
         \nPer idle connection: {:.1} KiB on the source node's agent, {:.1} KiB on the destination's. Target: ≤ 4 KiB per idle connection on each agent, and ≤ 64 MiB with 100 pods and 10k idle connections.\n",
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
}

fn issuance_section(out: &mut String, issuance: Vec<Issuance>) {
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
}

/// The latency CDF of the last run and the throughput ratios, as PNGs beside the report.
fn plots(
    out: &mut String,
    args: &BenchArgs,
    bed: &Bed,
    closed_loop: &[HttpRuns],
    ratios: &[(&str, f64)],
) -> anyhow::Result<()> {
    let http_paths = &bed.http_paths;
    let curves: Vec<plot::Curve> = http_paths
        .iter()
        .zip(closed_loop)
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
    Ok(())
}
