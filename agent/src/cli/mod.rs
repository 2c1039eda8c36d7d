//! Operator commands. On a node they read the agent's admin API: `nodemesh status` (this
//! node's pods, identities and health) and `nodemesh top` (live request rates and
//! latencies). From a laptop they go through the API server (`cluster`): the same two over
//! the whole cluster, and `nodemesh check`.

pub mod admin_client;
pub mod cluster;
pub mod prometheus;
pub mod status;
pub mod top;

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, SystemTime},
};

/// Where the admin API listens unless told otherwise (the agent's default).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";

/// Where `status` and `top` look: this node's agent, or the cluster.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The agent's admin API (on a node).
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Go through the API server with this kubeconfig (implies --cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Show the whole cluster through the API server, even where an agent runs. Without
    /// this, the cluster is shown when no agent answers at --admin and a kubeconfig is at
    /// hand (KUBECONFIG, ~/.kube/config); as `kubectl nodemesh`, always.
    #[arg(long)]
    pub cluster: bool,
    /// The namespace nodemesh is installed in.
    #[arg(long, default_value = cluster::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl Target {
    /// Whether to go through the API server; `plugin` when run as `kubectl nodemesh`.
    fn cluster_wide(&self, plugin: bool) -> bool {
        if self.cluster || self.kubeconfig.is_some() || plugin {
            return true;
        }
        let no_agent = TcpStream::connect_timeout(&self.admin, Duration::from_millis(500)).is_err();
        if no_agent && cluster::configuration_at_hand() {
            eprintln!(
                "no nodemesh agent at {}: showing the cluster through the API server",
                self.admin
            );
            return true;
        }
        false
    }

    fn connect(&self) -> Result<cluster::ClusterClient, cluster::ClusterError> {
        cluster::ClusterClient::connect(self.kubeconfig.as_deref())
    }
}

/// `nodemesh status [--node N]`.
pub fn status(target: &Target, node: Option<&str>, plugin: bool) -> anyhow::Result<()> {
    let now = SystemTime::now();
    if node.is_none() && !target.cluster_wide(plugin) {
        let now_unix = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", status::report(target.admin, now_unix)?);
        return Ok(());
    }
    let view = cluster::status::ClusterView::fetch(&target.connect()?)?;
    match node {
        None => print!("{}", cluster::status::report(&view, now)),
        Some(node) => match cluster::status::node_report(&view, node, now) {
            Some(report) => print!("{report}"),
            None => anyhow::bail!(
                "no MeshNode {node}: no agent has reported from a node of that name \
                 (`nodemesh status` lists the nodes)"
            ),
        },
    }
    Ok(())
}

/// `nodemesh top`: this node's agent, every agent through the API server, or Prometheus.
pub fn top(
    target: &Target,
    prometheus: Option<&str>,
    metrics_port: u16,
    every: Option<Duration>,
    plugin: bool,
) -> anyhow::Result<()> {
    let every = every.unwrap_or(cluster::top::default_interval(prometheus.is_some()));
    if let Some(url) = prometheus {
        return top::run_with(&mut cluster::top::Prometheus::new(url)?, every);
    }
    if !target.cluster_wide(plugin) {
        return top::run(target.admin);
    }
    let mut agents = cluster::top::AgentPods::new(
        target.connect()?,
        &target.namespace,
        "app.kubernetes.io/name=nodemesh-agent",
        metrics_port,
    );
    top::run_with(&mut agents, every)
}

/// `nodemesh check`: fails (non-zero exit) when a check fails.
pub fn check(kubeconfig: Option<&std::path::Path>, namespace: &str) -> anyhow::Result<()> {
    let cluster = cluster::ClusterClient::connect(kubeconfig)?;
    let findings = cluster::check::run(&cluster, namespace)?;
    let (report, passed) = cluster::check::report(&findings);
    print!("{report}");
    anyhow::ensure!(
        passed,
        "some checks failed: fix what they say, then run nodemesh check again"
    );
    Ok(())
}
