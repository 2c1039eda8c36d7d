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
//! - Short-lived connections end to end (`short_lived.rs`): connect() + 64-byte echo + close()
//!   from a non-meshed pod vs a meshed pod whose connections are captured and proxied, with
//!   the rate of the first and the last thousand and the TIME_WAIT sockets left behind. (A
//!   captured connect() alone completes against the in-pod listener and says nothing about
//!   the proxy.)
//! - 1 KiB keep-alive HTTP/1.1 request latency, cross-node, from a non-meshed pod (direct) vs
//!   a meshed pod: to a non-meshed pod (L4 without mTLS: the source's proxy relays plain
//!   TCP), to a meshed pod's address (L4: both node proxies relay bytes over HBONE mutual
//!   TLS) and to a Service with an HTTPRoute (L7: the client's node proxy parses, routes and
//!   balances every request); with the agents' CPU time per 10k requests.
//! - HTTP/2 (h2load, prior knowledge): one connection with 10 concurrent streams, requests/s
//!   and per-request latency from h2load's log, direct vs through the L7 proxy.
//! - Server-first protocols: time from connect() to a server's banner when the client sends
//!   nothing, direct vs through a Service port without `appProtocol` (protocol detection
//!   waits its bounded time) vs one declared `tcp` vs one on an opaque port (MySQL's; no
//!   detection either way): detection's added delay.
//! - Open-loop HTTP/1.1 at fixed offered loads (`--loads`, 16 keep-alive connections,
//!   wrk2-style: latency from when each request was due), the same four paths: achieved
//!   rate and p50/p99/p999.
//! - Bulk: one connection echoing `--bulk-mib` MiB cross-node, direct vs through the source's
//!   proxy alone (plain TCP to a non-meshed pod) vs HBONE mTLS.
//! - Zones (`zones.rs`): keep-alive HTTP/1.1 at concurrency 1, 4 and 16 to a Service with an
//!   endpoint in the client's zone and one in a zone 2 ms further away, zone preference off
//!   and on: p50/p99 against direct, and the share of requests that left the zone.
//! - Agent memory (RSS) idle, with 100 enrolled pods on a node, and holding 10,000 idle
//!   proxied connections from one pod to a pod on the other node.
//! - Enrolment: a pod appears on node1 (cgroup, sandbox process, then its manifest with a
//!   podIP, in the order the kubelet and the API server produce them); the time until the
//!   agent's admin API lists it as enrolled, polled every millisecond (an upper bound).
//! - DNS (`dns.rs`): queries/s with one in flight (dnsperf) to a resolver on the other node,
//!   from a non-meshed pod vs a meshed one (answered in the pod, or forwarded); and the
//!   queries the resolver sees for one `curl` with ndots:5.
//! - CA issuance: certificates signed per second by `nodemesh ca serve` with 1 and 8 requests
//!   in flight, each as an agent makes it (new key pair, CSR, TLS connection, POST).
//! - Same node (`same_node.rs`, last): 1 KiB keep-alive HTTP/1.1 at concurrency 1 between pods
//!   of node1, direct vs meshed pod to meshed pod vs through a Service with an HTTPRoute whose
//!   endpoint is on the node: both meshed paths are handed over in process, not HBONE.
//!
//! Around every watched scenario (`observe.rs`), the report also gives the agents' heap
//! allocations and the CPU time of each agent and of the whole machine per unit of work.
//!
//! The testbed runs the nodemesh CA as a pod, so meshed-to-meshed traffic is what users get:
//! mutual TLS through the source and destination proxies.
//!
//! `setup.rs` starts the agents and the servers, `scenarios.rs` runs one repetition of every
//! scenario, `report.rs` writes the markdown and the plots; `probes.rs` holds the
//! measurements they share and `stats.rs` what they record.

mod cpu;
mod dns;
mod flame;
mod heap;
mod observe;
mod probes;
mod report;
mod same_node;
mod scenarios;
mod setup;
mod short_lived;
mod stats;
mod zones;

use anyhow::{Context, bail};
use nodemesh_testbed::{ClusterMode, Testbed};

pub use self::probes::process_cpu_seconds;

const HTTP_PORT: u16 = 8080;
const BANNER_PORT: u16 = 2525;
/// Services in front of server-b's banner server: detected, declared `appProtocol: tcp`,
/// and on MySQL's port, one of the agent's default `--opaque-ports`.
const BANNER_DETECTED_IP: &str = "198.18.201.20";
const BANNER_DECLARED_IP: &str = "198.18.201.21";
const BANNER_OPAQUE_IP: &str = "198.18.201.22";
const OPAQUE_PORT: u16 = 3306;
/// Banner reads per run and path.
const BANNER_READS: usize = 20;
/// The Service (with an HTTPRoute) in front of server-b that the L7 scenarios use.
const L7_SERVICE_IP: &str = "198.18.201.10";

/// The HTTPRoute of the L7 scenarios' Service `name` (in `mesh`, port 80): every request
/// matched, a header set, sent to the Service itself.
fn l7_route(name: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: mesh}}
spec:
  parentRefs: [{{group: '', kind: Service, name: {name}, port: 80}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /}}}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {{set: [{{name: x-bench, value: l7}}]}}
      backendRefs: [{{name: {name}, port: 80}}]
"
    )
}
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
    /// Measure the agents' memory only (idle, 100 pods, idle connections) and print that
    /// section: the quick loop while working on memory. Not with `--write`.
    #[arg(long, conflicts_with = "write")]
    memory_only: bool,
    /// Measure DNS only (answered in the pod vs by the resolver) and print that section.
    /// Not with `--write`.
    #[arg(long, conflicts_with_all = ["write", "memory_only"])]
    dns_only: bool,
    /// Measure the zone scenario only and print that section. Not with `--write`.
    #[arg(long, conflicts_with_all = ["write", "memory_only", "dns_only"])]
    zones_only: bool,
    /// Measure short-lived connections only (`--connects` per run) and print that section.
    /// Not with `--write`.
    #[arg(long, conflicts_with_all = ["write", "memory_only", "dns_only", "zones_only"])]
    short_lived_only: bool,
    /// Measure the request paths only (keep-alive HTTP/1.1 over each path, HTTP/2 through
    /// L7, bulk) with the agents' allocations and the CPU per unit, and print those
    /// sections: the quick loop while working on the data path. Not with `--write`.
    #[arg(long, conflicts_with_all = ["write", "memory_only", "dns_only", "zones_only", "short_lived_only"])]
    paths_only: bool,
    /// Sample both agents' CPU with perf during each meshed scenario of `--short-lived-only`
    /// or `--paths-only`, and write each one's flame graph and top frames into this
    /// directory (`cpu.rs`).
    #[arg(long)]
    cpu_profile: Option<std::path::PathBuf>,
    /// Run every `nodemesh` process under heaptrack and write, per process, its peak
    /// consumers and a folded-stack file of the peak into this directory (`heap.rs`).
    #[arg(long)]
    heap_profile: Option<std::path::PathBuf>,
    /// Run every `nodemesh` process with this environment variable too (`NAME=VALUE`,
    /// repeatable): the allocator experiment (`MALLOC_ARENA_MAX=2`, an `LD_PRELOAD`ed
    /// allocator) without a rebuild. Not with `--heap-profile`.
    #[arg(long, value_parser = env_pair, conflicts_with = "heap_profile")]
    agent_env: Vec<(String, String)>,
}

fn env_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.cpu_profile.is_some() && !(args.short_lived_only || args.paths_only) {
        bail!("--cpu-profile goes with --short-lived-only or --paths-only");
    }
    // heaptrack sees glibc's malloc only, so a heap profile is of an agent built with it.
    // The agents count their allocations for the report's per-request and per-connection
    // figures (an uncontended atomic add per allocation: telemetry/allocations.rs).
    let (mut nodemesh, workload) = crate::build_binaries_with(
        true,
        crate::AgentBuild {
            system_allocator: args.heap_profile.is_some(),
            count_allocations: true,
        },
    )?;
    if let Some(dir) = &args.heap_profile {
        nodemesh = heap::wrap(&nodemesh, dir)?;
    }
    if !args.agent_env.is_empty() {
        nodemesh = heap::with_env(&nodemesh, &args.agent_env)?;
    }
    let report = crate::with_testbed_of(
        "nmbench",
        (nodemesh, workload),
        ClusterMode::Manifests,
        |tb| measure(tb, args),
    )?;
    println!("{report}");
    if let Some(dir) = &args.heap_profile {
        for summary in heap::summarise(dir)? {
            println!("heap profile: {}", summary.display());
        }
    }
    if args.write {
        write_report(&report)?;
    }
    Ok(())
}

fn measure(tb: &mut Testbed, args: &BenchArgs) -> anyhow::Result<String> {
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 24 * 3600)?;
    let bed = setup::prepare(tb, args, &ca)?;
    if args.dns_only {
        let dns = dns::measure(tb, &bed.direct_b, &bed.dns_log, args.runs)?;
        let mut out = report::header(args);
        dns::section(&mut out, dns);
        return Ok(out);
    }
    if args.zones_only {
        let mut runs = zones::ZoneRuns::default();
        let requests = scenarios::zone_requests(args);
        for _ in 0..args.runs {
            zones::one_run(tb, &bed.workload, &bed.direct_a, requests, &mut runs)?;
        }
        let mut out = report::header(args);
        zones::section(&mut out, requests, runs);
        return Ok(out);
    }
    if args.short_lived_only {
        let mut runs = short_lived::ShortLivedRuns::default();
        let mut usage = observe::UsageRuns::default();
        for run in 0..args.runs {
            short_lived::one_run(
                tb,
                &bed.workload,
                args.connects,
                [&bed.direct_a, &bed.server_a],
                &mut runs,
                &mut usage,
                observe::Watch {
                    profiles: args.cpu_profile.as_deref().map(|dir| (dir, run)),
                },
            )?;
            probes::wait_proxy_idle(tb, std::time::Duration::from_secs(10))?;
        }
        let mut out = report::header(args);
        short_lived::section(&mut out, args.connects, &runs);
        usage.sections(&mut out);
        return Ok(out);
    }
    if args.paths_only {
        let mut results = scenarios::Results::new(args, bed.http_paths.len());
        for run in 0..args.runs {
            eprintln!("bench: paths, run {}/{}", run + 1, args.runs);
            let watch = observe::Watch {
                profiles: args.cpu_profile.as_deref().map(|dir| (dir, run)),
            };
            scenarios::paths_run(tb, args, &bed, &mut results, watch)?;
        }
        let mut out = report::paths_only(args, &bed, results);
        same_node_section(tb, args, &bed, &mut out)?;
        return Ok(out);
    }
    let idle_rss = [
        probes::agent_rss_mib(tb, "node1")?,
        probes::agent_rss_mib(tb, "node2")?,
    ];
    // First, so that a failure here costs little: the agents' memory with 100 pods and with
    // many idle connections; it puts the testbed back as it was.
    eprintln!(
        "bench: memory with 100 pods and {} idle connections",
        args.idle_connections
    );
    let memory = probes::memory(tb, &bed.workload, args.idle_connections)?;
    if args.memory_only {
        return Ok(report::memory_only(args, &memory, idle_rss));
    }
    let mut results = scenarios::Results::new(args, bed.http_paths.len());
    for run in 0..args.runs {
        eprintln!("bench run {}/{}", run + 1, args.runs);
        scenarios::one_run(tb, args, &bed, &ca, run, &mut results)?;
    }
    // After the runs: the L7 proxy keeps its upstream connections to the zone scenario's
    // server on node1 pooled, which node1's inbound counts as open, and each run ends by
    // waiting for node1's proxy to be idle.
    eprintln!("bench: zones");
    for _ in 0..args.runs {
        let requests = scenarios::zone_requests(args);
        zones::one_run(
            tb,
            &bed.workload,
            &bed.direct_a,
            requests,
            &mut results.zones,
        )?;
    }
    eprintln!("bench: DNS");
    let dns = dns::measure(tb, &bed.direct_b, &bed.dns_log, args.runs)?;
    let mut out = report::render(args, &bed, results, &memory, idle_rss)?;
    dns::section(&mut out, dns);
    same_node_section(tb, args, &bed, &mut out)?;
    Ok(out)
}

/// The same-node paths' runs and their section; after every other scenario (same_node.rs
/// says why).
fn same_node_section(
    tb: &Testbed,
    args: &BenchArgs,
    bed: &setup::Bed,
    out: &mut String,
) -> anyhow::Result<()> {
    eprintln!("bench: same node");
    let mut runs = same_node::Runs::default();
    for _ in 0..args.runs {
        same_node::one_run(tb, args, &bed.workload, &bed.same_node, &mut runs)?;
    }
    same_node::section(out, &bed.same_node, &runs);
    Ok(())
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
