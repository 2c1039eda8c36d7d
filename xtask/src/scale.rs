//! `cargo xtask scale`: what the cluster's size costs one agent, against a real API server.
//!
//! A kube-apiserver and etcd run on loopback (the testbed's control plane, in /dev/shm so
//! that etcd's files stay off the disk), loaded with N pods spread over `--nodes` nodes and
//! one Service with an EndpointSlice per `--pods-per-service` pods, shaped like a real
//! cluster's objects (`scale/cluster.rs`). One agent runs with `--kubernetes` for a node that
//! has none of them, in the host's network namespace with a cgroup and bpffs directory of
//! its own, behind a loopback relay that counts the bytes the API server sends it. For each
//! N, twice (before and after the Services are added, which separates the cost of a pod from
//! that of a Service), it measures: time from start to ready, the resident-set high-water
//! mark at ready (VmHWM: the peak during the initial list), the resident set once settled
//! (VmRSS), and the bytes received; with the Services, also its CPU time while pods churn at
//! `--churn-rate` events/s. The report and a plot of memory against N go to
//! docs/benchmarks.md with `--write`.

mod cluster;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nodemesh_testbed::ControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::plot;
use cluster::Layout;

const NODE: &str = "scale-node";
const REPORT_START: &str = "<!-- scale:start -->";
const REPORT_END: &str = "<!-- scale:end -->";
/// How long the agent settles after ready before its steady memory is read.
const SETTLE: Duration = Duration::from_secs(5);
/// Below this much available memory the next, larger step is skipped.
const MEMORY_PER_100K_PODS_GIB: f64 = 6.0;

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// Cluster sizes in pods, ascending (each step adds pods to the last).
    #[arg(long, value_delimiter = ',', default_value = "1000,20000,150000")]
    pods: Vec<usize>,
    /// Pods per Service (each Service has one EndpointSlice listing its pods).
    #[arg(long, default_value_t = 10)]
    pods_per_service: usize,
    /// Nodes the pods are spread over (none of them the agent's).
    #[arg(long, default_value_t = 500)]
    nodes: usize,
    /// Pod events per second during the churn measurement.
    #[arg(long, default_value_t = 100)]
    churn_rate: u64,
    #[arg(long, default_value_t = 30)]
    churn_seconds: u64,
    /// API requests in flight while loading the cluster.
    #[arg(long, default_value_t = 48)]
    concurrency: usize,
    /// Replace the generated section of docs/benchmarks.md and its plot.
    #[arg(long)]
    write: bool,
}

/// One agent run.
#[derive(Clone, Debug)]
struct AgentRun {
    pods: usize,
    services: usize,
    ready_s: f64,
    /// The agent's own count from its log: start of the watches to the end of the lists.
    sync_s: Option<f64>,
    peak_mib: f64,
    steady_mib: f64,
    received_mib: f64,
    churn: Option<Churn>,
}

#[derive(Clone, Debug)]
struct Churn {
    events_per_s: f64,
    cpu_percent: f64,
    idle_cpu_percent: f64,
}

pub fn run(args: &ScaleArgs) -> anyhow::Result<()> {
    if !crate::nix_is_root() {
        bail!("the agent loads eBPF programs: run as root");
    }
    let (nodemesh, _) = crate::build_binaries(true)?;
    let plane = ControlPlane::loopback(&["--service-cluster-ip-range=10.96.0.0/12"])
        .context("starting the control plane")?;
    let node = BenchNode::create()?;
    let relay = {
        let to = plane.api_server_addr();
        plane.run(async move { Ok(Relay::start(to).await) })?
    };
    let kubeconfig = write_kubeconfig(&plane, relay.addr)?;
    let agent = Agent {
        binary: nodemesh,
        node: &node,
        kubeconfig,
        relay: &relay,
        log: plane.dir().join("agent.log"),
    };
    let layout = Layout {
        pods_per_service: args.pods_per_service,
        nodes: args.nodes,
    };
    plane.run(cluster::namespaces(plane.client()))?;
    let baseline = agent.run(0, 0, None)?;
    eprintln!("scale: empty cluster: {baseline:?}");
    let mut runs = Vec::new();
    let (mut pods, mut services) = (0, 0);
    let mut skipped = None;
    for &target in &args.pods {
        let needed = target as f64 / 100_000.0 * MEMORY_PER_100K_PODS_GIB;
        if available_gib() < needed {
            skipped = Some(format!(
                "{target} pods skipped: {:.1} GiB of memory available, about {needed:.0} GiB needed",
                available_gib()
            ));
            break;
        }
        let started = Instant::now();
        plane.run(cluster::pods(
            plane.client(),
            layout,
            pods,
            target,
            args.concurrency,
        ))?;
        eprintln!("scale: {target} pods written in {:.0?}", started.elapsed());
        pods = target;
        let pods_only = agent.run(pods, services, None)?;
        eprintln!("scale: {pods_only:?}");
        let wanted = target / args.pods_per_service;
        plane.run(cluster::services(
            plane.client(),
            layout,
            services,
            wanted,
            args.concurrency,
        ))?;
        services = wanted;
        let churn = ChurnPlan {
            plane: &plane,
            layout,
            first_new: 10_000_000 + pods,
            rate: args.churn_rate,
            duration: Duration::from_secs(args.churn_seconds),
        };
        let full = agent.run(pods, services, Some(&churn))?;
        eprintln!("scale: {full:?}");
        runs.push((pods_only, full));
    }
    let report = report(args, &baseline, &runs, skipped.as_deref())?;
    println!("{report}");
    if args.write {
        crate::bench::replace_section("docs/benchmarks.md", REPORT_START, REPORT_END, &report)?;
    }
    Ok(())
}

/// Memory available to new processes, GiB.
fn available_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}

/// The agent's node: a cgroup tree in the kubelet's layout, a bpffs directory and a
/// directory for the handoff socket, removed on drop (removing the bpffs directory unpins,
/// and so detaches, everything the agent pinned).
struct BenchNode {
    cgroup: PathBuf,
    bpffs: PathBuf,
    run: PathBuf,
}

impl BenchNode {
    fn create() -> anyhow::Result<Self> {
        let name = format!("nmscale{}", std::process::id());
        let node = Self {
            cgroup: nodemesh_testbed::cgroup2_root()?.join(&name),
            bpffs: Path::new(nodemesh_testbed::BPFFS_ROOT).join(&name),
            // The agent makes it (mode 0700) at its start.
            run: std::env::temp_dir().join(format!("{name}-run")),
        };
        std::fs::create_dir_all(node.cgroup.join("kubepods/besteffort"))
            .with_context(|| format!("creating {}", node.cgroup.display()))?;
        std::fs::create_dir_all(&node.bpffs)
            .with_context(|| format!("creating {}", node.bpffs.display()))?;
        Ok(node)
    }
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.run);
        for dir in ["kubepods/besteffort", "kubepods", ""] {
            let _ = std::fs::remove_dir(self.cgroup.join(dir));
        }
    }
}

/// A TCP relay in front of the API server that counts what the server sends.
struct Relay {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("local address");
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (mut from_agent, mut to_agent) = inbound.into_split();
                let (mut from_server, mut to_server) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_agent, &mut to_server).await;
                });
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(n) = from_server.read(&mut buffer).await {
                        if n == 0 || to_agent.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Self { addr, received }
    }
}

/// A kubeconfig for the agent: the admin's token, through the relay.
fn write_kubeconfig(plane: &ControlPlane, relay: SocketAddr) -> anyhow::Result<PathBuf> {
    let path = plane.dir().join("scale-agent.kubeconfig");
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "scale", "cluster": {
            "server": format!("https://{relay}"),
            "certificate-authority": plane.ca_cert().display().to_string()}}],
        "users": [{"name": "admin", "user": {
            "tokenFile": plane.dir().join("admin.token").display().to_string()}}],
        "contexts": [{"name": "scale", "context": {"cluster": "scale", "user": "admin"}}],
        "current-context": "scale",
    });
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

/// Pod churn to run while an agent is measured.
struct ChurnPlan<'a> {
    plane: &'a ControlPlane,
    layout: Layout,
    first_new: usize,
    rate: u64,
    duration: Duration,
}

struct Agent<'a> {
    binary: PathBuf,
    node: &'a BenchNode,
    kubeconfig: PathBuf,
    relay: &'a Relay,
    log: PathBuf,
}

impl Agent<'_> {
    fn run(
        &self,
        pods: usize,
        services: usize,
        churn: Option<&ChurnPlan<'_>>,
    ) -> anyhow::Result<AgentRun> {
        let admin = free_port()?;
        let log = std::fs::File::create(&self.log)?;
        self.relay.received.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let mut child = Command::new(&self.binary)
            .args(["agent", "--node-name", NODE, "--kubernetes"])
            .arg("--cgroup-root")
            .arg(&self.node.cgroup)
            .arg("--bpffs")
            .arg(&self.node.bpffs)
            .args(["--admin-addr", &admin.to_string()])
            .arg("--handoff-socket")
            .arg(self.node.run.join("handoff.sock"))
            .args(["--kubernetes-sync-timeout-seconds", "900"])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        let measured = self.measure(&mut child, admin, started, pods, services, churn);
        let _ = child.kill();
        let _ = child.wait();
        measured
            .with_context(|| format!("agent log {}:\n{}", self.log.display(), tail(&self.log, 30)))
    }

    fn measure(
        &self,
        child: &mut Child,
        admin: SocketAddr,
        started: Instant,
        pods: usize,
        services: usize,
        churn: Option<&ChurnPlan<'_>>,
    ) -> anyhow::Result<AgentRun> {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the agent exited before ready: {status}");
            }
            if ready(admin) {
                break;
            }
            if started.elapsed() > Duration::from_secs(900) {
                bail!("the agent was not ready within 900 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ready_s = started.elapsed().as_secs_f64();
        let pid = child.id();
        let peak_mib = proc_status_kib(pid, "VmHWM:")? / 1024.0;
        let received_mib = self.relay.received.load(Ordering::Relaxed) as f64 / 1024.0 / 1024.0;
        std::thread::sleep(SETTLE);
        let steady_mib = proc_status_kib(pid, "VmRSS:")? / 1024.0;
        let churn = match churn {
            None => None,
            Some(plan) => {
                let idle_window = Duration::from_secs(10);
                let before = crate::bench::process_cpu_seconds(pid)?;
                std::thread::sleep(idle_window);
                let idle_cpu_percent = (crate::bench::process_cpu_seconds(pid)? - before)
                    / idle_window.as_secs_f64()
                    * 100.0;
                let before = (crate::bench::process_cpu_seconds(pid)?, Instant::now());
                let (client, layout) = (plan.plane.client(), plan.layout);
                let (first_new, rate, duration) = (plan.first_new, plan.rate, plan.duration);
                let events = plan.plane.run(async move {
                    cluster::churn(client, layout, first_new, rate, duration).await
                })?;
                let seconds = before.1.elapsed().as_secs_f64();
                Some(Churn {
                    events_per_s: events as f64 / seconds,
                    cpu_percent: (crate::bench::process_cpu_seconds(pid)? - before.0) / seconds
                        * 100.0,
                    idle_cpu_percent,
                })
            }
        };
        Ok(AgentRun {
            pods,
            services,
            ready_s,
            sync_s: sync_seconds(&self.log),
            peak_mib,
            steady_mib,
            received_mib,
            churn,
        })
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Whether the admin API answers `/readyz` with 200.
fn ready(admin: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The agent's own count of its initial list, from its log (text `seconds=1.2` or JSON
/// `"seconds":1.2`).
fn sync_seconds(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("initial list from the Kubernetes API server complete"))?;
    let value = line.split("seconds").nth(1)?;
    let number: String = value
        .trim_start_matches(['=', '"', ':'])
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number.parse().ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn report(
    args: &ScaleArgs,
    baseline: &AgentRun,
    runs: &[(AgentRun, AgentRun)],
    skipped: Option<&str>,
) -> anyhow::Result<String> {
    let mut out = format!(
        "Command: `cargo xtask scale --pods {} --pods-per-service {} --nodes {} --churn-rate {} --churn-seconds {}` (release build), {} CPUs. \
         Empty cluster: ready in {:.1} s, {:.1} MiB resident.\n\n\
         | pods | Services (EndpointSlices) | ready s | initial list s | peak RSS MiB (during the list) | steady RSS MiB | peak / steady | received from the API server MiB |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        args.pods
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.pods_per_service,
        args.nodes,
        args.churn_rate,
        args.churn_seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        baseline.ready_s,
        baseline.steady_mib,
    );
    for run in runs.iter().flat_map(|(a, b)| [a, b]) {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            run.pods,
            run.services,
            run.ready_s,
            run.sync_s.map_or("–".into(), |s| format!("{s:.1}")),
            run.peak_mib,
            run.steady_mib,
            run.peak_mib / run.steady_mib,
            run.received_mib,
        ));
    }
    out.push_str("\n| pods | bytes per remote pod | bytes per Service (with its EndpointSlice of 10 endpoints) | pod events/s | agent CPU under churn (% of a core) | idle (% of a core) |\n|---:|---:|---:|---:|---:|---:|\n");
    let mut previous_services = 0;
    for (pods_only, full) in runs {
        let per_service = (full.steady_mib - pods_only.steady_mib) * 1024.0 * 1024.0
            / (full.services - previous_services).max(1) as f64;
        let per_pod = (pods_only.steady_mib - baseline.steady_mib) * 1024.0 * 1024.0
            - per_service * previous_services as f64;
        let per_pod = per_pod / pods_only.pods.max(1) as f64;
        previous_services = full.services;
        let churn = full.churn.as_ref();
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {} | {} | {} |\n",
            full.pods,
            per_pod,
            per_service,
            churn.map_or("–".into(), |c| format!("{:.0}", c.events_per_s)),
            churn.map_or("–".into(), |c| format!("{:.1}", c.cpu_percent)),
            churn.map_or("–".into(), |c| format!("{:.1}", c.idle_cpu_percent)),
        ));
    }
    if let Some(skipped) = skipped {
        out.push_str(&format!("\n{skipped}.\n"));
    }
    let point = |run: &AgentRun, mib: f64| (run.pods as f64, mib);
    let curves = [
        plot::Curve {
            name: "steady RSS, pods and Services".into(),
            points: std::iter::once((0.0, baseline.steady_mib))
                .chain(runs.iter().map(|(_, f)| point(f, f.steady_mib)))
                .collect(),
        },
        plot::Curve {
            name: "peak RSS during the initial list".into(),
            points: std::iter::once((0.0, baseline.peak_mib))
                .chain(runs.iter().map(|(_, f)| point(f, f.peak_mib)))
                .collect(),
        },
        plot::Curve {
            name: "steady RSS, pods only".into(),
            points: std::iter::once((0.0, baseline.steady_mib))
                .chain(runs.iter().map(|(p, _)| point(p, p.steady_mib)))
                .collect(),
        },
    ];
    let dir = if args.write {
        crate::workspace_root().join("docs")
    } else {
        crate::target_dir().join("bench")
    };
    std::fs::create_dir_all(&dir)?;
    plot::write(
        &dir,
        "scale-memory",
        &plot::lines(
            "Agent memory against cluster size (one Service per 10 pods)",
            "pods in the cluster",
            "MiB",
            &curves,
        ),
    )?;
    out.push_str("\n![agent memory against cluster size](scale-memory.png)\n");
    Ok(out)
}
