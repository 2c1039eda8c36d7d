//! The agent's configuration: command-line flags, validated once into `AgentConfig`.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use nodemesh_common::FailMode;

use crate::lifecycle::handoff::HandoffAddress;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Name of the Kubernetes node this agent serves (pods with this spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Directory of Kubernetes YAML manifests (Namespaces, Pods, Services, EndpointSlices) to
    /// use as the cluster state instead of an API server. Watched for changes.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub cluster_state: Option<PathBuf>,
    /// Watch the Kubernetes API server (in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    pub kubernetes: bool,
    /// `<namespace>/<name>` of the agent's own DaemonSet (with --kubernetes): when the agent
    /// is stopped while it is gone or being deleted, that is an uninstall, and the agent
    /// removes everything it put on the node (pinned programs and maps, pods' policy routing).
    /// Any other stop keeps capture attached (restarts, upgrades, drains).
    #[arg(long, requires = "kubernetes")]
    pub daemonset: Option<String>,
    /// How long the initial list from the API server may take before the agent gives up.
    #[arg(long, default_value_t = 60)]
    pub kubernetes_sync_timeout_seconds: u64,
    /// With --kubernetes: how often the agent writes its node's MeshNode status when nothing
    /// changed (its heartbeat), in seconds. A change is written at once, but never less
    /// than a sixth of this after the previous write; readers count an agent silent after
    /// three intervals without a heartbeat.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub node_status_interval_seconds: u64,
    /// The node's cgroup v2 directory that holds `kubepods` (or `kubepods.slice`).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// bpffs directory where this agent pins its programs and maps.
    #[arg(long, default_value = "/sys/fs/bpf/nodemesh")]
    pub bpffs: PathBuf,
    /// The node's `/proc/sys/net`, writable, where the agent sets meshed pods' network
    /// sysctls from inside each pod (the directory shows the writer's network namespace).
    /// A container's own /proc/sys is read-only: the DaemonSet mounts the node's here.
    #[arg(long, default_value = "/proc/sys/net")]
    pub proc_sys_net: PathBuf,
    /// What a meshed pod's connect() does while no proxy listens: `open` lets it through
    /// untouched, `closed` refuses it at once.
    #[arg(long, value_enum, default_value_t = FailModeArg::Open)]
    pub fail_mode: FailModeArg,
    /// Destination port never captured (repeatable).
    #[arg(long = "exclude-port")]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDR never captured, e.g. 10.0.0.0/8 or fd00::/8 (repeatable).
    #[arg(long = "exclude-cidr", value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<IpNet>,
    /// Address of the admin HTTP server (health, readiness, config dump, stats).
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,
    /// Port of the outbound listener the agent opens on each meshed pod's loopback.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// DNS capture (docs/dns.md): the port of the DNS listener the agent opens on each
    /// meshed pod's loopback, where the pod's UDP queries to port 53 are steered, e.g. 15053
    /// (a pod opts out with label `nodemesh.io/dns=disabled`). 0, the default, leaves DNS
    /// alone and attaches no DNS program.
    #[arg(long, default_value_t = 0)]
    pub dns_port: u16,
    /// The cluster's DNS domain: names under it are answered from the cluster state.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// How long a forwarded DNS query may wait for the pod's resolver before the pod gets
    /// SERVFAIL, in milliseconds (below the C library's 5 s, so it can try its next server).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=30_000))]
    pub dns_forward_timeout_ms: u64,
    /// SO_MARK put on every proxy socket; the connect hook captures only into a listener
    /// carrying it. It exempts nothing from capture (the agent's cgroup is never enrolled).
    #[arg(long, default_value_t = 0x4e4d_0001)]
    pub proxy_mark: u32,
    /// SO_MARK of the proxy's connections to applications that carry the client's address;
    /// policy routing in each pod keeps the replies to them local. Must differ from
    /// --proxy-mark.
    #[arg(long, default_value_t = 0x4e4d_0002)]
    pub transparent_mark: u32,
    /// How long the proxy waits for an upstream TCP handshake, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// How long the proxy waits for the first bytes of a connection to a Service port without
    /// an HTTP `appProtocol` before treating it as opaque TCP, in milliseconds. It is the most
    /// a server-speaks-first protocol's first bytes are delayed.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub protocol_detection_timeout_ms: u64,
    /// Ports relayed as opaque TCP without protocol detection, unless the Service port's
    /// `appProtocol` says otherwise: the well-known ports of protocols where the server
    /// speaks first (SMTP, MySQL, PostgreSQL, Redis, Elasticsearch transport, memcached;
    /// Linkerd's default opaque ports), whose clients would otherwise wait out the
    /// detection timeout for the server's first bytes. Service ports at the source, target
    /// ports at the destination. An empty value detects on every port.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub opaque_ports: Vec<u16>,
    /// Also serve `/metrics` (only) here, for Prometheus from outside the node: the node's
    /// own address, e.g. 10.0.0.5:15090 (the chart passes `$(HOST_IP):15090`; an IPv6
    /// address may come without brackets, the port is what follows its last colon). The
    /// admin address stays on loopback.
    #[arg(long, value_parser = listen_address)]
    pub metrics_addr: Option<SocketAddr>,
    /// Fraction of connections and HTTP requests written to the access log (JSON lines on
    /// stdout): 1 logs every one, 0 none.
    #[arg(long, default_value_t = 1.0, value_parser = sample_rate)]
    pub access_log_sample_rate: f64,
    /// Worker threads of the agent's runtime, which run the proxy's connections and the
    /// agent's tasks. Default: half the CPUs the agent may use, at least 1 and at most 2
    /// (docs/benchmarks.md, "The runtime: worker threads").
    #[arg(long, env = "NODEMESH_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// Carry connections between two meshed pods of this node over HBONE, with TLS and
    /// HTTP/2 as between nodes, instead of handing them from the outbound to the inbound side
    /// in process (the default; docs/hbone.md, "Between pods of one node"). For comparison.
    #[arg(long, env = "NODEMESH_SAME_NODE_HBONE", value_parser = clap::builder::BoolishValueParser::new())]
    pub same_node_hbone: bool,
    /// OTLP/HTTP traces endpoint (e.g. http://otel-collector:4318/v1/traces); without it no
    /// spans are exported (traceparent is propagated either way).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Address of the nodemesh CA as `host:port` (a DNS name is resolved at each request);
    /// without it the agent holds no workload certificates.
    #[arg(long)]
    pub ca_addr: Option<String>,
    /// Name the CA's serving certificate must carry.
    #[arg(long, default_value = "nodemesh-ca")]
    pub ca_server_name: String,
    /// File holding the token the agent presents to the CA. Read again for every request, so
    /// a projected token the kubelet rotates is picked up.
    #[arg(long)]
    pub ca_token_file: Option<PathBuf>,
    /// PEM file of the trusted root certificates (several during a root rotation).
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Unix socket over which a running agent hands its in-pod listeners to its successor
    /// (restart, DaemonSet surge upgrade). Its directory must be the agent's alone: the agent
    /// creates it with mode 0700, narrows a wider mode that lets nobody else write, and
    /// refuses a link or a directory of another user or that others can write.
    #[arg(long, default_value = "/run/nodemesh/handoff.sock")]
    pub handoff_socket: HandoffAddress,
    /// After SIGTERM, how long the agent keeps serving the connections it has (new ones go
    /// to its successor, or follow --fail-mode) before it exits. Keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 20)]
    pub drain_grace_seconds: u64,
    /// Connections one pod may have through the proxy at once, in each direction (outbound,
    /// and plaintext arriving at it); more are reset, counted and logged, so that one pod
    /// cannot exhaust the proxy for the others. Size it with the agent's memory limit: a
    /// held connection costs the agent about 40 KiB (docs/security.md).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections_per_pod: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailModeArg {
    Open,
    Closed,
}

impl From<FailModeArg> for FailMode {
    fn from(arg: FailModeArg) -> Self {
        match arg {
            FailModeArg::Open => FailMode::Open,
            FailModeArg::Closed => FailMode::Closed,
        }
    }
}

/// Validated configuration, built once and passed down.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub cluster_source: ClusterSourceConfig,
    /// The agent's DaemonSet, whose deletion makes a stop an uninstall.
    pub daemonset: Option<String>,
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub proc_sys_net: PathBuf,
    pub fail_mode: FailMode,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub admin_addr: SocketAddr,
    pub outbound_port: u16,
    pub proxy_mark: u32,
    pub transparent_mark: u32,
    pub connect_timeout: Duration,
    pub protocol_detection_timeout: Duration,
    pub opaque_ports: OpaquePorts,
    pub access_log_sample_rate: f64,
    /// Worker threads of the agent's runtime.
    pub worker_threads: usize,
    /// Connections between meshed pods of this node skip HBONE (`--same-node-hbone` off).
    pub same_node_handoff: bool,
    pub otlp_endpoint: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub identity: Option<IdentityConfig>,
    pub trust_domain: String,
    pub handoff_socket: HandoffAddress,
    pub drain_grace: Duration,
    pub max_connections_per_pod: usize,
    /// DNS capture (none with `--dns-port 0`).
    pub dns: Option<DnsConfig>,
}

/// DNS capture's settings.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub port: u16,
    /// The cluster domain, fully qualified (`cluster.local.`).
    pub cluster_domain: hickory_proto::rr::Name,
    pub forward_timeout: Duration,
}

/// Where the agent learns the cluster state from.
#[derive(Clone, Debug)]
pub enum ClusterSourceConfig {
    Manifests(PathBuf),
    Kubernetes {
        sync_timeout: Duration,
        /// The MeshNode heartbeat (`--node-status-interval-seconds`).
        node_status_interval: Duration,
    },
}

/// Where the agent gets workload certificates from.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// `host:port`.
    pub ca_addr: String,
    pub ca_server_name: rustls_pki_types::ServerName<'static>,
    pub token_file: PathBuf,
    pub trust_bundle: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--node-name must not be empty")]
    EmptyNodeName,
    #[error("--cluster-state {0}: not a directory")]
    ClusterStateNotADirectory(PathBuf),
    #[error("--cgroup-root {0}: not a directory")]
    CgroupRootNotADirectory(PathBuf),
    #[error("--proc-sys-net {0}: not the network sysctls (no ipv4/ in it)")]
    ProcSysNet(PathBuf),
    #[error("--outbound-port must not be 0")]
    ZeroOutboundPort,
    #[error("--proxy-mark must not be 0 (unmarked sockets would count as the proxy's)")]
    ZeroProxyMark,
    #[error("--cluster-domain {0:?} is not a DNS name")]
    ClusterDomain(String),
    #[error("--transparent-mark must be non-zero and differ from --proxy-mark")]
    TransparentMark,
    #[error("--ca-addr {0:?}: expected host:port")]
    CaAddr(String),
    #[error("--ca-addr needs --ca-token-file and --trust-bundle")]
    IncompleteCa,
    #[error("--ca-token-file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ca-token-file {0}: empty")]
    EmptyToken(PathBuf),
    #[error("--ca-server-name {0:?}: not a DNS name or IP address")]
    ServerName(String),
    #[error("--trust-domain {0:?}: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
}

impl TryFrom<AgentArgs> for AgentConfig {
    type Error = ConfigError;

    fn try_from(args: AgentArgs) -> Result<Self, ConfigError> {
        if args.node_name.trim().is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        let cluster_source = match args.cluster_state {
            Some(dir) if !dir.is_dir() => return Err(ConfigError::ClusterStateNotADirectory(dir)),
            Some(dir) => ClusterSourceConfig::Manifests(dir),
            None => ClusterSourceConfig::Kubernetes {
                sync_timeout: Duration::from_secs(args.kubernetes_sync_timeout_seconds),
                node_status_interval: Duration::from_secs(args.node_status_interval_seconds),
            },
        };
        if !args.cgroup_root.is_dir() {
            return Err(ConfigError::CgroupRootNotADirectory(args.cgroup_root));
        }
        if !args.proc_sys_net.join("ipv4").is_dir() {
            return Err(ConfigError::ProcSysNet(args.proc_sys_net));
        }
        if args.outbound_port == 0 {
            return Err(ConfigError::ZeroOutboundPort);
        }
        if args.proxy_mark == 0 {
            return Err(ConfigError::ZeroProxyMark);
        }
        let dns = if args.dns_port == 0 {
            None
        } else {
            let domain = format!("{}.", args.cluster_domain.trim_end_matches('.'));
            let cluster_domain = hickory_proto::rr::Name::from_ascii(&domain)
                .ok()
                .filter(|name| name.num_labels() > 0)
                .ok_or_else(|| ConfigError::ClusterDomain(args.cluster_domain.clone()))?;
            Some(DnsConfig {
                port: args.dns_port,
                cluster_domain,
                forward_timeout: Duration::from_millis(args.dns_forward_timeout_ms),
            })
        };
        if args.transparent_mark == 0 || args.transparent_mark == args.proxy_mark {
            return Err(ConfigError::TransparentMark);
        }
        if crate::identity::spiffe::SpiffeId::new(&args.trust_domain, "x", "x").is_err() {
            return Err(ConfigError::TrustDomain(args.trust_domain));
        }
        let identity = match (args.ca_addr, args.ca_token_file, args.trust_bundle) {
            (None, _, _) => None,
            (Some(ca_addr), Some(token_file), Some(trust_bundle)) => {
                if !ca_addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                {
                    return Err(ConfigError::CaAddr(ca_addr));
                }
                // Checked once here so a wrong path fails at start; read again per request.
                crate::identity::ca_client::read_token(&token_file).map_err(
                    |error| match error {
                        crate::identity::ca_client::CaClientError::Token { path, source } => {
                            ConfigError::TokenFile { path, source }
                        }
                        _ => ConfigError::EmptyToken(token_file.clone()),
                    },
                )?;
                let ca_server_name =
                    rustls_pki_types::ServerName::try_from(args.ca_server_name.clone())
                        .map_err(|_| ConfigError::ServerName(args.ca_server_name.clone()))?;
                Some(IdentityConfig {
                    ca_addr,
                    ca_server_name,
                    token_file,
                    trust_bundle,
                })
            }
            (Some(_), _, _) => return Err(ConfigError::IncompleteCa),
        };
        Ok(Self {
            identity,
            trust_domain: args.trust_domain,
            node_name: args.node_name,
            cluster_source,
            daemonset: args.daemonset,
            cgroup_root: args.cgroup_root,
            bpffs: args.bpffs,
            proc_sys_net: args.proc_sys_net,
            fail_mode: args.fail_mode.into(),
            exclude_ports: args.exclude_ports,
            exclude_cidrs: args.exclude_cidrs,
            admin_addr: args.admin_addr,
            outbound_port: args.outbound_port,
            proxy_mark: args.proxy_mark,
            transparent_mark: args.transparent_mark,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            protocol_detection_timeout: Duration::from_millis(args.protocol_detection_timeout_ms),
            opaque_ports: OpaquePorts::new(args.opaque_ports),
            access_log_sample_rate: args.access_log_sample_rate,
            worker_threads: args
                .worker_threads
                .map_or_else(default_worker_threads, std::num::NonZeroUsize::get),
            same_node_handoff: !args.same_node_hbone,
            otlp_endpoint: args.otlp_endpoint,
            metrics_addr: args.metrics_addr,
            handoff_socket: args.handoff_socket,
            drain_grace: Duration::from_secs(args.drain_grace_seconds),
            max_connections_per_pod: usize::try_from(args.max_connections_per_pod)
                .unwrap_or(usize::MAX),
            dns,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/8")]
    MissingPrefix(String),
    #[error("{0:?}: {1:?} is not an IP address")]
    BadAddress(String, String),
    #[error("{0:?}: prefix length must be 0..={1}")]
    BadPrefix(String, u8),
    #[error("{0:?}: host bits are set; did you mean {1}?")]
    HostBitsSet(String, IpNet),
}

/// An IP prefix such as `10.0.0.0/8`; host bits must be zero. (ipnet's own parser accepts
/// host bits and says only that the text is invalid: this one names what is wrong.)
pub fn parse_cidr(text: &str) -> Result<IpNet, CidrError> {
    let (addr_text, prefix_text) = text
        .split_once('/')
        .ok_or_else(|| CidrError::MissingPrefix(text.to_owned()))?;
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| CidrError::BadAddress(text.to_owned(), addr_text.to_owned()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let cidr = prefix_text
        .parse()
        .ok()
        .and_then(|prefix_len| IpNet::new(addr, prefix_len).ok())
        .ok_or(CidrError::BadPrefix(text.to_owned(), max))?;
    let network = cidr.trunc();
    if network != cidr {
        return Err(CidrError::HostBitsSet(text.to_owned(), network));
    }
    Ok(cidr)
}

/// `ADDRESS:PORT`, where an IPv6 address may also come without brackets (as a
/// Kubernetes `$(HOST_IP):15090` expands on an IPv6 node).
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.rsplit_once(':')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)))
        .ok_or_else(|| format!("{text:?} is not ADDRESS:PORT"))
}

/// Workers for the CPUs this process may use (its affinity and cgroup quota, as std reads
/// them).
fn default_worker_threads() -> usize {
    worker_threads_for(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// Half of `cpus`, at least 1 and at most 2 (ztunnel's default is 2 workers): a node agent
/// shares the node's cores with the pods it serves, and on a 2-CPU node one worker was as
/// fast as two or faster on every path measured (fewer wake-ups crossing threads;
/// docs/benchmarks.md, "The runtime: worker threads"). Nodes whose meshed traffic needs
/// more are given more with `--worker-threads`.
fn worker_threads_for(cpus: usize) -> usize {
    (cpus / 2).clamp(1, 2)
}

/// A fraction in [0, 1].
fn sample_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_half_the_cpus_from_one_to_two() {
        for (cpus, workers) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (64, 2)] {
            assert_eq!(worker_threads_for(cpus), workers, "{cpus} CPUs");
        }
    }

    #[test]
    fn listen_addresses_take_ipv6_with_or_without_brackets() {
        let v4: SocketAddr = "10.0.0.5:15090".parse().unwrap();
        assert_eq!(listen_address("10.0.0.5:15090"), Ok(v4));
        let v6: SocketAddr = "[fd00::5]:15090".parse().unwrap();
        assert_eq!(listen_address("[fd00::5]:15090"), Ok(v6));
        assert_eq!(listen_address("fd00::5:15090"), Ok(v6));
        assert!(listen_address("$(HOST_IP):15090").is_err());
        assert!(listen_address("10.0.0.5").is_err());
        assert!(listen_address("10.0.0.5:99999").is_err());
    }

    #[test]
    fn parses_v4_and_v6_prefixes() {
        let v4 = parse_cidr("10.1.0.0/16").unwrap();
        assert_eq!(v4.prefix_len(), 16);
        let v6 = parse_cidr("fd00::/8").unwrap();
        assert_eq!(v6.addr(), "fd00::".parse::<IpAddr>().unwrap());
        let all = parse_cidr("0.0.0.0/0").unwrap();
        assert_eq!(all.prefix_len(), 0);
    }

    #[test]
    fn rejects_bad_cidrs_with_a_hint() {
        assert!(matches!(
            parse_cidr("10.0.0.0"),
            Err(CidrError::MissingPrefix(_))
        ));
        assert!(matches!(
            parse_cidr("10.0.0.300/8"),
            Err(CidrError::BadAddress(..))
        ));
        assert!(matches!(
            parse_cidr("10.0.0.0/33"),
            Err(CidrError::BadPrefix(_, 32))
        ));
        let err = parse_cidr("10.1.2.3/16").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"10.1.2.3/16\": host bits are set; did you mean 10.1.0.0/16?"
        );
    }
}

/// Ports where the proxy relays without protocol detection (`--opaque-ports`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpaquePorts(Vec<u16>);

impl OpaquePorts {
    pub fn new(mut ports: Vec<u16>) -> Self {
        ports.sort_unstable();
        ports.dedup();
        Self(ports)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }
}
