//! The testbed itself: building the fake cluster, changing it while it runs, tearing it down.
//! Its pods are in `pods.rs`; what its names and topology must be, in `validate.rs`.

mod pods;
mod validate;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use self::validate::{check_name, check_prefix, validate};
use crate::{
    api_cluster, cgroup,
    cleanup::{self, Shared, TeardownReport, lock},
    cluster_state,
    control_plane::{self, ControlPlane},
    error::{IoContext, Result, TestbedError},
    naming, netns,
    pod::{self, Node, Pod},
    topology::{NamespaceSpec, TopologySpec},
    util,
};

/// Where the testbed keeps its cluster state, the thing the agents and the CA watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMode {
    /// A real kube-apiserver and etcd in the bridge namespace (see `control_plane.rs`): the
    /// agents run with `--kubernetes`, the CA with TokenReview, under the chart's RBAC.
    ApiServer,
    /// A directory of Kubernetes YAML (`--cluster-state`): no control plane to start, so
    /// quicker; the bench and the datapath suite in VMs use it.
    Manifests,
}

impl ClusterMode {
    /// `NODEMESH_TESTBED_CLUSTER` (`api-server` or `manifests`), else `default`.
    pub fn from_env_or(default: ClusterMode) -> ClusterMode {
        match std::env::var("NODEMESH_TESTBED_CLUSTER").as_deref() {
            Ok("manifests") => ClusterMode::Manifests,
            Ok("api-server") => ClusterMode::ApiServer,
            _ => default,
        }
    }
}

/// Which binaries to use, how to name the testbed, where to keep agent logs.
#[derive(Clone, Debug)]
pub struct TestbedConfig {
    /// Start of the testbed's name (e.g. `nmt` in tests, `nmdemo` in the demo); keep it short.
    pub prefix: String,
    /// The `nodemesh` binary (started by `start_agent`).
    pub nodemesh_bin: PathBuf,
    /// The `nodemesh-workload` binary (pods' pause processes and test programs).
    pub workload_bin: PathBuf,
    /// Where agent logs go; default `<tmp>/<testbed>-logs`. The default directory is kept after
    /// an explicit `teardown()` and after a panic (to read), deleted when a testbed is dropped
    /// without either (a passing test).
    pub log_dir: Option<PathBuf>,
    /// Where the cluster state lives.
    pub cluster: ClusterMode,
    /// Values files for the chart's `helm install` (API server mode), e.g. the one
    /// `cargo xtask image` writes to pin the image.
    pub chart_values: Vec<PathBuf>,
    /// `--worker-threads` of the agents started as binaries, by node; a node not listed
    /// runs the agent's default. [`TestbedConfig::from_workspace`], the tests' config, sets
    /// [`test_worker_threads`].
    pub worker_threads: Vec<(String, usize)>,
}

/// The tests run node1's agent with one worker thread (the default on a machine of two
/// CPUs, as CI's) and node2's with two, so traffic between the nodes crosses both on any
/// machine, in every suite. The bench and the demo run the default, as users get it.
fn test_worker_threads() -> Vec<(String, usize)> {
    vec![("node1".to_owned(), 1), ("node2".to_owned(), 2)]
}

impl TestbedConfig {
    /// A config using the binaries `workspace_bin` finds next to the running executable.
    pub fn from_workspace(prefix: &str) -> Result<Self> {
        Ok(Self {
            prefix: prefix.to_owned(),
            nodemesh_bin: crate::try_workspace_bin("nodemesh")?,
            workload_bin: crate::try_workspace_bin("nodemesh-workload")?,
            log_dir: None,
            cluster: ClusterMode::from_env_or(ClusterMode::ApiServer),
            chart_values: Vec::new(),
            worker_threads: test_worker_threads(),
        })
    }

    /// The same with the cluster state in `mode`.
    pub fn with_cluster(mut self, mode: ClusterMode) -> Self {
        self.cluster = mode;
        self
    }
}

/// A fake Kubernetes cluster: nodes and pods as network namespaces, kubelet-style cgroups,
/// Kubernetes YAML as cluster state. Dropping it (or `teardown`) removes everything.
pub struct Testbed {
    pub(crate) name: String,
    pub(crate) config: TestbedConfig,
    pub(crate) log_dir: PathBuf,
    pub(crate) cgroup2_root: PathBuf,
    pub(crate) cluster_state_dir: PathBuf,
    pub(crate) namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) pods: Vec<Pod>,
    pub(crate) shared: Shared,
    /// The API server, in [`ClusterMode::ApiServer`].
    pub(crate) control_plane: Option<ControlPlane>,
    /// The UID of each node's agent Pod (API server mode).
    pub(crate) agent_pods: BTreeMap<String, String>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("name", &self.name)
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

/// bpffs must be mounted before agents can pin anything; mount it once per process if absent.
static BPFFS_LOCK: Mutex<()> = Mutex::new(());

fn ensure_bpffs() -> Result<()> {
    let _guard = lock(&BPFFS_LOCK);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .io_context(|| "reading /proc/self/mountinfo".to_owned())?;
    let mounted = mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(left, right)| {
            left.split_whitespace().nth(4) == Some(naming::BPFFS_ROOT)
                && right.split_whitespace().next() == Some("bpf")
        })
    });
    if mounted {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {}", naming::BPFFS_ROOT);
    std::fs::create_dir_all(naming::BPFFS_ROOT)
        .io_context(|| format!("creating {}", naming::BPFFS_ROOT))?;
    nix::mount::mount(
        Some("bpf"),
        naming::BPFFS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .io_context(|| format!("mounting bpffs at {}", naming::BPFFS_ROOT))
}

/// The chart the control plane installs (`deploy/helm/nodemesh` of this workspace).
fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/helm/nodemesh")
        .components()
        .collect()
}

impl Testbed {
    /// Builds the whole topology; on failure everything created so far is removed again.
    pub fn create(config: TestbedConfig, topo: TopologySpec) -> Result<Testbed> {
        check_prefix(&config.prefix)?;
        validate(&topo)?;
        if !util::is_root() {
            return Err(TestbedError::Other(
                "the testbed creates network namespaces and cgroups: run as root".into(),
            ));
        }
        let cgroup2_root = cgroup::cgroup2_root()?;
        let name = naming::new_name(&config.prefix);
        // Our pid may have belonged to a process that died with a testbed of this very name.
        if !cleanup::leftovers(&name).is_empty() {
            for error in cleanup::remove_stale_name(&name) {
                tracing::warn!(testbed = %name, %error, "removing a stale testbed of our name");
            }
        }
        let shared = cleanup::register(&name);
        let log_dir = config
            .log_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("{name}-logs")));
        let mut testbed = Testbed {
            cluster_state_dir: naming::cluster_state_dir(&name),
            name,
            config,
            log_dir,
            cgroup2_root,
            namespaces: BTreeMap::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            shared,
            control_plane: None,
            agent_pods: BTreeMap::new(),
        };
        // An error from here on drops `testbed`, whose Drop removes what was created.
        testbed.build(&topo)?;
        tracing::info!(testbed = %testbed.name, pods = testbed.pods.len(), "testbed ready");
        Ok(testbed)
    }

    fn build(&mut self, topo: &TopologySpec) -> Result<()> {
        ensure_bpffs()?;
        std::fs::create_dir_all(&self.cluster_state_dir)
            .io_context(|| format!("creating {}", self.cluster_state_dir.display()))?;
        // Tests write their programs' logs there from the start (before any agent runs).
        std::fs::create_dir_all(&self.log_dir)
            .io_context(|| format!("creating {}", self.log_dir.display()))?;
        // Each node's own /run/nodemesh lives in it (made by its agent, or its kubelet).
        let run = naming::run_dir(&self.name);
        std::fs::create_dir_all(&run).io_context(|| format!("creating {}", run.display()))?;
        let bridge = format!("{}-br", self.name);
        self.add_netns(&bridge, &[])?;
        let mut bridge_batch = vec![
            "link set lo up".to_owned(),
            "link add br0 type bridge mcast_snooping 0".to_owned(),
            "link set br0 up".to_owned(),
        ];
        for (i, spec) in topo.nodes.iter().enumerate() {
            let index = u8::try_from(i + 1).unwrap_or(u8::MAX);
            let node = Node {
                name: spec.name.clone(),
                index,
                netns: format!("{}-{}", self.name, spec.name),
                next_pod: 0,
            };
            for dir in [
                self.cgroup_root(&node.name).join("system"),
                self.cgroup_root(&node.name).join("kubepods/besteffort"),
            ] {
                cgroup::create(&dir)?;
            }
            let bpffs = self.bpffs_dir(&node.name);
            std::fs::create_dir_all(&bpffs)
                .io_context(|| format!("creating {}", bpffs.display()))?;
            self.add_netns(
                &node.netns,
                &[
                    ("net/ipv4/ip_forward", "1"),
                    ("net/ipv6/conf/all/forwarding", "1"),
                ],
            )?;
            // Created in the bridge namespace, its peer goes straight into the node's.
            bridge_batch.extend([
                format!(
                    "link add n{index} type veth peer name eth0 netns {}",
                    node.netns
                ),
                format!("link set n{index} master br0"),
                format!("link set n{index} up"),
            ]);
            self.nodes.push(node);
        }
        netns::ip_batch(&bridge, &bridge_batch)?;
        for node in &self.nodes {
            let k = node.index;
            let mut batch = vec![
                "link set lo up".to_owned(),
                "link set eth0 up".to_owned(),
                format!("addr add {}/24 dev eth0", pod::node_ipv4(k)),
                format!("addr add {}/64 dev eth0 nodad", pod::node_ipv6(k)),
            ];
            for other in self.nodes.iter().filter(|o| o.index != k) {
                let j = other.index;
                batch.push(format!(
                    "route add 198.18.{j}.0/24 via {}",
                    pod::node_ipv4(j)
                ));
                batch.push(format!("route add fd77:{j}::/64 via {}", pod::node_ipv6(j)));
            }
            netns::ip_batch(&node.netns, &batch)?;
        }
        if self.config.cluster == ClusterMode::ApiServer {
            self.start_control_plane(&bridge)?;
        }
        for ns in &topo.namespaces {
            self.add_namespace(ns.clone())?;
        }
        for node in &topo.nodes {
            for spec in &node.pods {
                self.create_pod(&node.name, spec)?;
            }
        }
        Ok(())
    }

    /// Starts etcd and the API server in the bridge namespace, installs the chart and the
    /// Gateway API CRDs, registers the nodes, and creates each node's agent Pod with its
    /// projected token and kubeconfig (`agent_kubeconfig`).
    fn start_control_plane(&mut self, bridge: &str) -> Result<()> {
        let mut batch = vec![format!(
            "addr add {}/24 dev br0",
            control_plane::API_SERVER_IP
        )];
        // Pods (the CA) reach the API server through their node; answers go back the same way.
        for node in &self.nodes {
            batch.push(format!(
                "route add 198.18.{}.0/24 via {}",
                node.index,
                node.ipv4()
            ));
        }
        netns::ip_batch(bridge, &batch)?;
        let cgroup = self.cgroup2_root.join(&self.name).join("control-plane");
        cgroup::create(&cgroup)?;
        let plane = ControlPlane::start(
            &naming::control_plane_dir(&self.name),
            &self.log_dir,
            bridge,
            &cgroup,
            self.shared.clone(),
        )?;
        plane.install(&chart_dir(), &self.config.chart_values)?;
        for node in &self.nodes {
            plane.register_node(&node.name, node.ipv4())?;
            let uid = plane.create_agent_pod(&node.name, node.ipv4())?;
            let token = plane.dir().join(format!("agent-{}.token", node.name));
            plane.project_token(
                api_cluster::SYSTEM_NAMESPACE,
                api_cluster::AGENT_SERVICE_ACCOUNT,
                (&api_cluster::agent_pod_name(&node.name), &uid),
                &[],
                &token,
            )?;
            plane.write_kubeconfig(&format!("agent-{}", node.name), &token)?;
            self.agent_pods.insert(node.name.clone(), uid);
        }
        self.control_plane = Some(plane);
        Ok(())
    }

    /// The kubeconfig of `node`'s agent: the chart's agent ServiceAccount, with a token bound
    /// to the node's agent Pod (API server mode).
    pub fn agent_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let path = self.api()?.dir().join(format!("agent-{node}.kubeconfig"));
        if path.exists() {
            Ok(path)
        } else {
            Err(TestbedError::UnknownNode(node.to_owned()))
        }
    }

    /// The UID of `node`'s agent Pod (API server mode).
    pub fn agent_pod_uid(&self, node: &str) -> Result<&str> {
        self.api()?;
        self.agent_pods
            .get(node)
            .map(String::as_str)
            .ok_or_else(|| TestbedError::UnknownNode(node.to_owned()))
    }

    /// Creates a network namespace (recording it first), disables DAD, applies sysctls.
    fn add_netns(&self, name: &str, sysctls: &[(&str, &str)]) -> Result<()> {
        {
            let mut res = lock(&self.shared);
            // A Ctrl-C handler may have torn us down mid-creation: create nothing more.
            if res.torn_down {
                return Err(TestbedError::Other(format!(
                    "testbed {} was torn down",
                    self.name
                )));
            }
            res.netns.push(name.to_owned());
        }
        netns::add(name)?;
        // Interfaces created later copy `default`: with DAD off their IPv6 addresses work at once.
        let mut settings = vec![
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ];
        settings.extend_from_slice(sysctls);
        netns::write_sysctls(name, &settings)
    }

    /// Adds a Kubernetes namespace (created in the API server, or its YAML written).
    pub fn add_namespace(&mut self, spec: NamespaceSpec) -> Result<()> {
        check_name("namespace", &spec.name)?;
        self.write_namespace(&spec.name, &spec.labels)?;
        self.namespaces.insert(spec.name, spec.labels);
        Ok(())
    }

    fn write_namespace(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        match &self.control_plane {
            Some(api) => api.apply_namespace(name, labels),
            None => {
                cluster_state::write_namespace(&self.cluster_state_dir, name, labels).map(|_| ())
            }
        }
    }

    /// A TCP connection to `addr` made from inside `pod`'s network namespace by the test
    /// process itself (not from the pod's cgroup, so no connect hook captures it).
    pub fn connect_from_pod(
        &self,
        pod: &Pod,
        addr: std::net::SocketAddr,
    ) -> Result<std::net::TcpStream> {
        crate::netns::in_netns(pod.netns(), move || {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
                .io_context(|| format!("connecting to {addr}"))
        })
    }

    /// Writes (or rewrites) any Kubernetes object into the cluster state: server-side
    /// applied to the API server, or written to the manifest directory as `file`.
    pub fn apply_object<T: serde::Serialize>(&self, file: &str, object: &T) -> Result<()> {
        match &self.control_plane {
            Some(api) => api.apply(object).map(|_| ()),
            None => cluster_state::write_any(&self.cluster_state_dir, file, object).map(|_| ()),
        }
    }

    /// The real API server of a testbed in [`ClusterMode::ApiServer`].
    pub fn api(&self) -> Result<&ControlPlane> {
        self.control_plane.as_ref().ok_or_else(|| {
            TestbedError::Other(format!(
                "testbed {} keeps its cluster state in manifests, not in an API server",
                self.name
            ))
        })
    }

    /// Which cluster state the testbed keeps.
    pub fn cluster_mode(&self) -> ClusterMode {
        self.config.cluster
    }

    /// Replaces a namespace's labels and rewrites its YAML.
    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        if !self.namespaces.contains_key(namespace) {
            return Err(TestbedError::UnknownNamespace(namespace.to_owned()));
        }
        self.write_namespace(namespace, &labels)?;
        self.namespaces.insert(namespace.to_owned(), labels);
        Ok(())
    }

    /// Tears everything down now and reports what (if anything) was left behind.
    pub fn teardown(self) -> Result<TeardownReport> {
        Ok(cleanup::teardown(&self.shared))
    }

    /// The testbed's unique name (`<prefix><pid>x<counter>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &TestbedConfig {
        &self.config
    }

    /// The directory of Kubernetes YAML the agents read (`--cluster-state`).
    pub fn cluster_state_dir(&self) -> &Path {
        &self.cluster_state_dir
    }

    /// Where the cgroup v2 hierarchy is mounted on this machine.
    pub fn cgroup2_root(&self) -> &Path {
        &self.cgroup2_root
    }

    /// The cgroup root of a node, as given to its agent (`<cgroup2 root>/<testbed>/<node>`).
    pub fn cgroup_root(&self, node: &str) -> PathBuf {
        self.cgroup2_root.join(&self.name).join(node)
    }

    /// The bpffs directory of a node's agent (`/sys/fs/bpf/<testbed>/<node>`).
    pub fn bpffs_dir(&self, node: &str) -> PathBuf {
        naming::bpffs_dir(&self.name).join(node)
    }

    /// The node's counterpart of `/run/nodemesh` (`<tmp>/<testbed>-run/<node>`): where its
    /// agents' handoff socket lives.
    pub fn node_run_dir(&self, node: &str) -> PathBuf {
        naming::run_dir(&self.name).join(node)
    }

    /// Where agent logs are written (kept after teardown).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The `nodemesh-workload` binary.
    pub fn workload_bin(&self) -> &Path {
        &self.config.workload_bin
    }

    /// The `nodemesh` agent binary.
    pub fn nodemesh_bin(&self) -> &Path {
        &self.config.nodemesh_bin
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this name.
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| TestbedError::UnknownNode(name.to_owned()))
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod `namespace/name`; panics if there is none (use `find_pod` to ask).
    pub fn pod(&self, namespace: &str, name: &str) -> &Pod {
        self.find_pod(namespace, name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name} in testbed {}", self.name))
    }

    /// The pod `namespace/name`, if it exists.
    pub fn find_pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Kubernetes namespaces and their labels.
    pub fn namespaces(&self) -> &BTreeMap<String, BTreeMap<String, String>> {
        &self.namespaces
    }

    /// Whether `teardown` has run (e.g. from `teardown_all_registered`).
    pub fn is_torn_down(&self) -> bool {
        lock(&self.shared).torn_down
    }

    pub(crate) fn shared_weak(&self) -> std::sync::Weak<Mutex<cleanup::Resources>> {
        Arc::downgrade(&self.shared)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.is_torn_down() {
            return;
        }
        let report = cleanup::teardown(&self.shared);
        if std::thread::panicking() {
            eprintln!(
                "testbed {}: agent logs kept in {}",
                self.name,
                self.log_dir.display()
            );
        } else if self.config.log_dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        if !report.is_clean() {
            // Tests rarely install a tracing subscriber: leftovers must be visible anyway.
            eprintln!(
                "testbed {}: teardown left {:?}, errors {:?}",
                report.name, report.leftovers, report.errors
            );
        }
    }
}
