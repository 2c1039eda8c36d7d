//! Measurements the scenarios share: h2load, enrolment latency, the agents' CPU time and
//! memory, the memory scenario, and running the workload binary in a pod for its JSON.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nodemesh_testbed::Testbed;
use serde_json::Value;

use super::{ECHO_PORT, stats::H2Run};

/// `requests` HTTP/2 requests from `from` to `target` with h2load: one connection, 10
/// streams in flight. Latencies come from its per-request log (third column, µs).
pub(super) fn h2load(
    tb: &Testbed,
    from: (&str, &str),
    target: &str,
    requests: u64,
) -> anyhow::Result<H2Run> {
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
pub(super) fn enrolment_latencies(
    tb: &mut Testbed,
    run: usize,
    count: usize,
) -> anyhow::Result<Vec<f64>> {
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
pub(super) fn wait_proxy_idle(tb: &Testbed, timeout: Duration) -> anyhow::Result<()> {
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
pub(super) fn agents_cpu_seconds(tb: &Testbed) -> anyhow::Result<f64> {
    Ok(cpu_seconds_by_agent(tb)?.iter().sum())
}

/// CPU time node1's and node2's agents have used so far, in seconds.
pub(super) fn cpu_seconds_by_agent(tb: &Testbed) -> anyhow::Result<[f64; 2]> {
    let mut seconds = [0.0; 2];
    for (seconds, node) in seconds.iter_mut().zip(["node1", "node2"]) {
        *seconds = process_cpu_seconds(tb.agent_pid(node).context("agent pid")?)?;
    }
    Ok(seconds)
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
pub(super) fn agent_rss_mib(tb: &Testbed, node: &str) -> anyhow::Result<f64> {
    Ok(tb.agent_rss_kib(node)? as f64 / 1024.0)
}

/// The agents' memory with 100 enrolled pods on node1, and with `connections` idle proxied
/// connections held from client-a (node1) to server-b (node2).
pub(super) struct Memory {
    pub(super) pods: usize,
    pub(super) with_pods: f64,
    pub(super) connections: usize,
    pub(super) node1_with_connections: f64,
    pub(super) node2_with_connections: f64,
}

pub(super) fn memory(
    tb: &mut Testbed,
    workload: &str,
    connections: usize,
) -> anyhow::Result<Memory> {
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

/// `requests` HTTP/1.1 requests from the pod `from` to `target` over `concurrency`
/// keep-alive connections (`http-bench`): its summary (latency percentiles, rate, CDF).
pub(super) fn http_bench(
    tb: &Testbed,
    from: (&str, &str),
    workload: &str,
    target: &str,
    requests: u64,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    run_json(
        tb,
        from,
        workload,
        &[
            "http-bench",
            "--target",
            target,
            "--requests",
            &requests.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ],
    )
}

pub(super) fn run_json(
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
