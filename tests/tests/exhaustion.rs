//! Unauthenticated exhaustion (docs/security.md, agent/src/serving.rs): the CA's port 15012
//! and the agent's `/metrics` listener take connections from anyone who reaches them. A
//! flood of clients that never send a request head or never finish the TLS handshake, from
//! one source and from many, gets what the bounds allow and no more: the processes' memory
//! stays bounded (measured), other clients are served meanwhile, and the idle connections
//! are closed at the timeout. The CA, out of file descriptors, pauses instead of spinning.
//!
//! The floods run in the server's own network namespace, from loopback addresses
//! 127.0.0.2 and up, so that one flood can come from many sources. Needs root.

use std::{
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use nodemesh_testbed::{
    AgentOptions, MeshCa, Testbed, TestbedConfig, TopologySpec, cpu_seconds, is_root, rss_kib,
    wait_until,
};
use serde_json::Value;

const CA_PORT: u16 = 15012;
const METRICS_PORT: u16 = 15090;
/// `nodemesh ca serve`'s defaults: connections per source and in all.
const CA_PER_SOURCE: usize = 32;
const CA_TOTAL: usize = 512;
/// The agent's `/metrics` listener: connections per source and in all.
const METRICS_PER_SOURCE: usize = 8;
const METRICS_TOTAL: usize = 64;
/// Both servers close a connection that has not completed its TLS handshake or sent a
/// request head in this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS record header announcing a 512-byte ClientHello, and its first byte.
const STALLED_TLS: &str = "16030102000001";
/// A request head that never ends.
const STALLED_HEAD: &str = "474554202f6d65747269637320485454502f312e310d0a486f73743a20780d0a";

/// A flood client, killed when dropped.
struct Flood(Child);

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a flood of `connections` from `sources` loopback addresses to `127.0.0.1:port` in
/// `netns`, each sending `preamble` (hex) or nothing; returns it, holding what it got, with
/// its report.
fn flood(
    tb: &Testbed,
    netns: &str,
    port: u16,
    (connections, sources): (usize, u8),
    preamble: Option<&str>,
    report: &Path,
) -> (Flood, Value) {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns])
        .arg(tb.workload_bin())
        .args(["flood", "--target", &format!("127.0.0.1:{port}")])
        .args(["--connections", &connections.to_string()])
        .args(["--sources", &sources.to_string(), "--hold-ms", "60000"])
        .arg("--report")
        .arg(report);
    match preamble {
        Some(hex) => command.args(["--preamble-hex", hex]),
        None => command.arg("--silent"),
    };
    let flood = Flood(command.spawn().expect("flood"));
    wait_until(Duration::from_secs(60), "the flood's report", || {
        Ok(report.exists())
    })
    .expect("flood report");
    let text = std::fs::read_to_string(report).expect("report");
    (flood, serde_json::from_str(&text).expect("report JSON"))
}

/// Connections the server on `port` in `netns` holds (its side, established).
fn held(netns: &str, port: u16) -> usize {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss");
    String::from_utf8_lossy(&output.stdout).lines().count()
}

/// Connections waiting in the listen queue of `port` in `netns` to be accepted.
fn accept_queue(netns: &str, port: u16) -> usize {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Hltn"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss");
    // State, Recv-Q (for a listener: the connections not yet accepted), ...
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|queued| queued.parse().ok())
        .unwrap_or(0)
}

fn counts(report: &Value) -> (u64, u64) {
    (
        report["established"].as_u64().unwrap_or(u64::MAX),
        report["refused"].as_u64().unwrap_or(u64::MAX),
    )
}

/// One source gets its share; the server holds those until the timeout and then closes
/// them.
fn one_source_gets_its_share_until_the_timeout(
    tb: &Testbed,
    netns: &str,
    port: u16,
    per_source: usize,
    dir: &Path,
) {
    let started = Instant::now();
    let asked = per_source + per_source / 4;
    let (_flood, report) = flood(tb, netns, port, (asked, 1), None, &dir.join("one.json"));
    assert_eq!(
        counts(&report),
        (per_source as u64, (asked - per_source) as u64),
        "{report}"
    );
    assert_eq!(held(netns, port), per_source, "the server holds them");
    wait_until(
        CLIENT_TIMEOUT + Duration::from_secs(10),
        "the silent connections closed",
        || Ok(held(netns, port) == 0),
    )
    .expect("closed at the timeout");
    assert!(
        started.elapsed() >= CLIENT_TIMEOUT - Duration::from_secs(1),
        "closed by the timeout, not before: {:?}",
        started.elapsed()
    );
}

/// Every source together gets the server's total and no more.
fn all_sources_get_the_total(
    tb: &Testbed,
    netns: &str,
    port: u16,
    limits: (usize, usize),
    dir: &Path,
) {
    let (per_source, total) = limits;
    let sources = total / per_source + 1;
    let asked = sources * per_source;
    let (_flood, report) = flood(
        tb,
        netns,
        port,
        (asked, sources as u8),
        None,
        &dir.join("all.json"),
    );
    assert_eq!(
        counts(&report),
        (total as u64, (asked - total) as u64),
        "{report}"
    );
}

fn wait_all_closed(netns: &str, port: u16) {
    wait_until(CLIENT_TIMEOUT * 2, "the flood's connections gone", || {
        Ok(held(netns, port) == 0)
    })
    .expect("connections gone");
}

fn meshed_testbed() -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace("nmexh").expect("config");
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb.start_ca(&ca_pod, 3600).expect("CA");
    (tb, ca)
}

/// One certificate request as node1's agent makes it, from the outsider pod; its outcome
/// and how long it took.
fn certificate_request(tb: &Testbed, ca: &MeshCa) -> (std::process::Output, Duration) {
    let client_a = tb.pod("mesh", "client-a");
    let mut load = Command::new(tb.workload_bin());
    load.args(["ca-load", "--ca", &ca.addr().to_string()])
        .arg("--trust-bundle")
        .arg(ca.trust_bundle())
        .arg("--token-file")
        .arg(ca.token_file("node1"))
        .args([
            "--pod",
            client_a.key().as_str(),
            "--pod-uid",
            client_a.uid(),
        ])
        .args(["--requests", "1"]);
    let started = Instant::now();
    let output = tb
        .run_in_pod(&tb.pod("plain", "outsider").clone(), load)
        .expect("ca-load");
    (output, started.elapsed())
}

#[test]
fn the_ca_stays_small_and_serves_agents_through_floods_of_idle_and_stalled_clients() {
    let (tb, ca) = meshed_testbed();
    let dir = tempfile::tempdir().expect("tempdir");
    let netns = tb.pod("nodemesh-system", "ca").netns().to_owned();
    let pid = ca.pid().expect("the CA runs as a process");
    let (output, _) = certificate_request(&tb, &ca);
    assert!(output.status.success(), "the control: {output:?}");

    one_source_gets_its_share_until_the_timeout(&tb, &netns, CA_PORT, CA_PER_SOURCE, dir.path());

    // Many sources, each at its share, stalling their TLS handshakes: the CA holds them all
    // (the attack is real), within bounded memory, and still serves an agent promptly.
    let idle_rss = rss_kib(pid).expect("RSS");
    let sources = CA_TOTAL / CA_PER_SOURCE - 2;
    let connections = sources * CA_PER_SOURCE;
    let (many, report) = flood(
        &tb,
        &netns,
        CA_PORT,
        (connections, sources as u8),
        Some(STALLED_TLS),
        &dir.path().join("many.json"),
    );
    assert_eq!(counts(&report), (connections as u64, 0), "{report}");
    assert_eq!(held(&netns, CA_PORT), connections);
    let flood_rss = rss_kib(pid).expect("RSS");
    let (output, took) = certificate_request(&tb, &ca);
    assert!(
        output.status.success(),
        "served during the flood: {output:?}"
    );
    assert!(took < Duration::from_secs(5), "served promptly: {took:?}");
    let per_connection = flood_rss.saturating_sub(idle_rss) * 1024 / connections as u64;
    eprintln!(
        "CA RSS: {idle_rss} KiB idle, {flood_rss} KiB holding {connections} stalled handshakes \
         (~{per_connection} B each); a certificate took {took:?}"
    );
    assert!(
        flood_rss < idle_rss + 32 * 1024,
        "RSS grew from {idle_rss} to {flood_rss} KiB for {connections} connections"
    );
    drop(many);
    wait_all_closed(&netns, CA_PORT);

    all_sources_get_the_total(&tb, &netns, CA_PORT, (CA_PER_SOURCE, CA_TOTAL), dir.path());
    assert!(
        ca.log()
            .contains("connection reset: its source, or the server, is at its bound"),
        "refusals are logged: {}",
        ca.log()
    );
}

#[test]
fn the_ca_pauses_accepting_when_out_of_file_descriptors_instead_of_spinning() {
    let (tb, ca) = meshed_testbed();
    let dir = tempfile::tempdir().expect("tempdir");
    let netns = tb.pod("nodemesh-system", "ca").netns().to_owned();
    let pid = ca.pid().expect("the CA runs as a process").to_string();
    // The soft limit only: the hard one stays, so that it can be raised again.
    let prlimit = |soft: &str| {
        let status = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:")])
            .status()
            .expect("prlimit");
        assert!(status.success(), "prlimit {soft}");
    };
    prlimit("64");
    // More connections than descriptors, from sources within their share: accept fails
    // with EMFILE while the rest wait in the listen queue.
    let (flood, _) = flood(
        &tb,
        &netns,
        CA_PORT,
        (4 * 30, 4),
        None,
        &dir.path().join("emfile.json"),
    );
    wait_until(Duration::from_secs(10), "accept failing", || {
        Ok(ca.log().contains("accepting a connection failed"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", ca.log()));
    let pid: u32 = pid.parse().expect("pid");
    let before = cpu_seconds(pid).expect("CPU time");
    // A measurement window, not a wait for anything: a CA retrying accept in a loop would
    // use a core throughout it.
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid).expect("CPU time") - before;
    let queued = accept_queue(&netns, CA_PORT);
    eprintln!(
        "CA CPU while out of file descriptors: {used:.3} s in 2 s, {queued} connections waiting"
    );
    assert!(queued > 0, "connections wait to be accepted throughout");
    assert!(
        used < 0.3,
        "the accept loop spins: {used:.3} s of CPU in 2 s"
    );

    // With descriptors back, the CA serves again.
    drop(flood);
    prlimit("4096");
    wait_until(
        Duration::from_secs(40),
        "a certificate issued again",
        || Ok(certificate_request(&tb, &ca).0.status.success()),
    )
    .expect("the CA recovers");
}

#[test]
fn the_metrics_listener_stays_small_and_answers_scrapes_through_floods() {
    let (tb, ca) = meshed_testbed();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut extra_args = ca.agent_args("node1");
    extra_args.extend(["--metrics-addr".to_owned(), "0.0.0.0:15090".to_owned()]);
    let options = AgentOptions {
        extra_args,
        ..Default::default()
    };
    tb.start_agent("node1", &options).expect("agent");
    let netns = tb.node("node1").expect("node").netns().to_owned();
    let pid = tb.agent_pid("node1").expect("agent pid");
    let scrape = || {
        let started = Instant::now();
        let output = Command::new("ip")
            .args(["netns", "exec", &netns, "curl", "-s", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{METRICS_PORT}/metrics"))
            .output()
            .expect("curl");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            started.elapsed(),
        )
    };
    assert_eq!(scrape().0, "200", "the control");

    one_source_gets_its_share_until_the_timeout(
        &tb,
        &netns,
        METRICS_PORT,
        METRICS_PER_SOURCE,
        dir.path(),
    );

    // Many sources, each at its share, sending half a request head.
    let idle_rss = tb.agent_rss_kib("node1").expect("RSS");
    let sources = METRICS_TOTAL / METRICS_PER_SOURCE - 1;
    let connections = sources * METRICS_PER_SOURCE;
    let (many, report) = flood(
        &tb,
        &netns,
        METRICS_PORT,
        (connections, sources as u8),
        Some(STALLED_HEAD),
        &dir.path().join("many.json"),
    );
    assert_eq!(counts(&report), (connections as u64, 0), "{report}");
    assert_eq!(held(&netns, METRICS_PORT), connections);
    let flood_rss = rss_kib(pid).expect("RSS");
    let (status, took) = scrape();
    assert_eq!(status, "200", "a scrape during the flood");
    assert!(took < Duration::from_secs(2), "answered promptly: {took:?}");
    eprintln!(
        "agent RSS: {idle_rss} KiB idle, {flood_rss} KiB holding {connections} stalled heads; \
         a scrape took {took:?}"
    );
    assert!(
        flood_rss < idle_rss + 8 * 1024,
        "RSS grew from {idle_rss} to {flood_rss} KiB for {connections} connections"
    );
    drop(many);
    wait_all_closed(&netns, METRICS_PORT);

    all_sources_get_the_total(
        &tb,
        &netns,
        METRICS_PORT,
        (METRICS_PER_SOURCE, METRICS_TOTAL),
        dir.path(),
    );
}
