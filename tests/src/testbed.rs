//! The testbed itself: building the fake cluster, changing it while it runs, tearing it down.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use crate::{
    cgroup,
    cleanup::{self, Shared, TeardownReport, Tracked, kill_and_reap, lock},
    cluster_state,
    error::{IoContext, Result, TestbedError},
    exec::Placement,
    naming, netns,
    pod::{self, Node, Pod},
    topology::{NamespaceSpec, PodSpec, TopologySpec},
    util,
};

/// Pods get 198.18.k.(10+i): at most this many per node.
const MAX_PODS_PER_NODE: u8 = 245;

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
}

impl TestbedConfig {
    /// A config using the binaries `workspace_bin` finds next to the running executable.
    pub fn from_workspace(prefix: &str) -> Result<Self> {
        Ok(Self {
            prefix: prefix.to_owned(),
            nodemesh_bin: crate::try_workspace_bin("nodemesh")?,
            workload_bin: crate::try_workspace_bin("nodemesh-workload")?,
            log_dir: None,
        })
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

/// The prefix is followed by the owner pid, so it must not end in a digit.
fn check_prefix(prefix: &str) -> Result<()> {
    let ok = (1..=20).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && prefix.as_bytes()[0].is_ascii_lowercase()
        && prefix.as_bytes()[prefix.len() - 1].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(TestbedError::Topology(format!(
            "testbed prefix {prefix:?} must be 1-20 characters of a-z and 0-9, starting and ending with a letter"
        )))
    }
}

/// Names must be usable in netns names, cgroup directories and file names.
fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TestbedError::Topology(format!(
            "{kind} name {name:?} must be 1-63 characters of a-z, 0-9 and '-'"
        )))
    }
}

fn validate(topo: &TopologySpec) -> Result<()> {
    if topo.nodes.is_empty() || topo.nodes.len() > 254 {
        return Err(TestbedError::Topology("1 to 254 nodes are needed".into()));
    }
    let mut namespaces = Vec::new();
    for ns in &topo.namespaces {
        check_name("namespace", &ns.name)?;
        if namespaces.contains(&&ns.name) {
            return Err(TestbedError::Topology(format!(
                "namespace {} twice",
                ns.name
            )));
        }
        namespaces.push(&ns.name);
    }
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for node in &topo.nodes {
        check_name("node", &node.name)?;
        // `<testbed>-br` is the bridge's namespace.
        if node.name == "br" {
            return Err(TestbedError::Topology("node name br is reserved".into()));
        }
        if nodes.contains(&&node.name) {
            return Err(TestbedError::Topology(format!("node {} twice", node.name)));
        }
        nodes.push(&node.name);
        if node.pods.len() > usize::from(MAX_PODS_PER_NODE) {
            return Err(TestbedError::Topology(format!(
                "too many pods on {}",
                node.name
            )));
        }
        for spec in &node.pods {
            check_name("pod", &spec.name)?;
            if !namespaces.contains(&&spec.namespace) {
                return Err(TestbedError::UnknownNamespace(spec.namespace.clone()));
            }
            let key = (&spec.namespace, &spec.name);
            if pods.contains(&key) {
                return Err(TestbedError::Topology(format!(
                    "pod {}/{} twice",
                    spec.namespace, spec.name
                )));
            }
            pods.push(key);
        }
    }
    Ok(())
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
        for ns in &topo.namespaces {
            self.add_namespace(ns.clone())?;
        }
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
        for node in &topo.nodes {
            for spec in &node.pods {
                self.create_pod(&node.name, spec)?;
            }
        }
        Ok(())
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

    /// Wires one pod: netns, veth, addresses, routes, cgroups, pause process, then its YAML.
    fn create_pod(&mut self, node_name: &str, spec: &PodSpec) -> Result<Pod> {
        let pod_cgroup_root = self.cgroup_root(node_name).join("kubepods/besteffort");
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node_name)
            .ok_or_else(|| TestbedError::UnknownNode(node_name.to_owned()))?;
        if node.next_pod >= MAX_PODS_PER_NODE {
            return Err(TestbedError::Topology(format!(
                "no pod addresses left on {node_name}"
            )));
        }
        let (k, i) = (node.index, node.next_pod);
        node.next_pod += 1;
        let node_netns = node.netns.clone();
        let uid = util::uuid_v4()?;
        let pod = Pod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: node_name.to_owned(),
            node_index: k,
            index: i,
            service_account: spec.service_account.clone(),
            labels: spec.labels.clone(),
            ipv4: pod::pod_ipv4(k, i),
            ipv6: pod::pod_ipv6(k, i),
            netns: format!("{}-{node_name}-{}-{}", self.name, spec.namespace, spec.name),
            host_veth: format!("p{i}"),
            pod_cgroup: pod_cgroup_root.join(format!("pod{uid}")),
            uid,
            container_id: util::container_id()?,
            sandbox_id: util::container_id()?,
            sandbox_pid: 0,
        };
        self.wire_pod(&node_netns, &pod)?;
        let mut pod = pod;
        pod.sandbox_pid = self.start_sandbox(&pod)?;
        cluster_state::write_pod(&self.cluster_state_dir, &pod)?;
        tracing::debug!(testbed = %self.name, pod = %pod.key(), ip = %pod.ipv4, "pod created");
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The pod's network: its namespace, the veth pair, addresses and routes on both ends.
    fn wire_pod(&self, node_netns: &str, pod: &Pod) -> Result<()> {
        self.add_netns(&pod.netns, &[])?;
        let (k, veth) = (pod.node_index, &pod.host_veth);
        let (gw4, gw6) = (pod::gateway_ipv4(k), pod::gateway_ipv6(k));
        netns::ip_batch(
            node_netns,
            &[
                // Created in the node, its peer appears as eth0 in the pod: no global name clashes.
                format!(
                    "link add {veth} type veth peer name eth0 netns {}",
                    pod.netns
                ),
                format!("addr add {gw4}/32 dev {veth}"),
                format!("addr add {gw6}/128 dev {veth} nodad"),
                format!("link set {veth} up"),
                format!("route add {}/32 dev {veth}", pod.ipv4),
                format!("route add {}/128 dev {veth}", pod.ipv6),
            ],
        )?;
        netns::ip_batch(
            &pod.netns,
            &[
                "link set lo up".to_owned(),
                format!("addr add {}/32 dev eth0", pod.ipv4),
                format!("addr add {}/128 dev eth0 nodad", pod.ipv6),
                "link set eth0 up".to_owned(),
                format!("route add {gw4}/32 dev eth0"),
                format!("route add 0.0.0.0/0 via {gw4} dev eth0"),
                format!("route add {gw6}/128 dev eth0"),
                format!("route add ::/0 via {gw6} dev eth0"),
            ],
        )
    }

    /// The pod's pause process: what holds its network namespace, as the sandbox does in Kubernetes.
    fn start_sandbox(&self, pod: &Pod) -> Result<u32> {
        for dir in [pod.cgroup(), pod.sandbox_cgroup()] {
            cgroup::create(&dir)?;
        }
        let mut command = Command::new(&self.config.workload_bin);
        command
            .arg("pause")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = Placement::new(&pod.netns, &pod.sandbox_cgroup())?
            .spawn(&mut command)
            .map_err(|error| {
                TestbedError::Other(format!(
                    "{error} (is the workload binary built? {})",
                    self.config.workload_bin.display()
                ))
            })?;
        let pid = child.id();
        let mut res = lock(&self.shared);
        if res.torn_down {
            let mut child = child;
            let _ = kill_and_reap(&mut child);
            return Err(TestbedError::Other(format!(
                "testbed {} was torn down",
                self.name
            )));
        }
        res.children.push(Tracked {
            what: format!("pause process of {}", pod.key()),
            pod: Some(pod.key()),
            child,
        });
        Ok(pid)
    }

    /// Adds a pod on `node` (network, cgroups, pause process) and then writes its YAML.
    pub fn add_pod(&mut self, node: &str, spec: PodSpec) -> Result<Pod> {
        check_name("pod", &spec.name)?;
        self.node(node)?;
        if !self.namespaces.contains_key(&spec.namespace) {
            return Err(TestbedError::UnknownNamespace(spec.namespace));
        }
        if self.find_pod(&spec.namespace, &spec.name).is_some() {
            return Err(TestbedError::Topology(format!(
                "pod {}/{} exists already",
                spec.namespace, spec.name
            )));
        }
        self.create_pod(node, &spec)
    }

    /// Removes a pod: deletes its YAML, kills its processes, removes its netns and cgroups.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        let position = self
            .pods
            .iter()
            .position(|p| p.namespace == pod.namespace && p.name == pod.name)
            .ok_or_else(|| TestbedError::UnknownPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })?;
        let pod = self.pods.remove(position);
        cluster_state::delete_pod(&self.cluster_state_dir, &pod.namespace, &pod.name)?;
        cgroup::kill_all(&pod.pod_cgroup)?;
        let key = pod.key();
        let mut res = lock(&self.shared);
        let (ours, others): (Vec<Tracked>, Vec<Tracked>) = std::mem::take(&mut res.children)
            .into_iter()
            .partition(|t| t.pod.as_deref() == Some(key.as_str()));
        res.children = others;
        res.netns.retain(|n| n != &pod.netns);
        drop(res);
        for mut tracked in ours {
            kill_and_reap(&mut tracked.child).io_context(|| format!("reaping {}", tracked.what))?;
        }
        // Its veth pair (and the node's host routes through it) go with the namespace.
        netns::delete(&pod.netns)?;
        cgroup::remove_tree(&pod.pod_cgroup)?;
        tracing::debug!(testbed = %self.name, pod = %key, "pod removed");
        Ok(())
    }

    /// Adds a Kubernetes namespace and writes its YAML.
    pub fn add_namespace(&mut self, spec: NamespaceSpec) -> Result<()> {
        check_name("namespace", &spec.name)?;
        cluster_state::write_namespace(&self.cluster_state_dir, &spec.name, &spec.labels)?;
        self.namespaces.insert(spec.name, spec.labels);
        Ok(())
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

    /// Writes (or rewrites) any Kubernetes object into the cluster state as `file`.
    pub fn apply_object<T: serde::Serialize>(&self, file: &str, object: &T) -> Result<()> {
        cluster_state::write_any(&self.cluster_state_dir, file, object).map(|_| ())
    }

    /// Replaces a namespace's labels and rewrites its YAML.
    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let current = self
            .namespaces
            .get_mut(namespace)
            .ok_or_else(|| TestbedError::UnknownNamespace(namespace.to_owned()))?;
        cluster_state::write_namespace(&self.cluster_state_dir, namespace, &labels)?;
        *current = labels;
        Ok(())
    }

    /// Replaces a pod's labels and rewrites its YAML; returns the updated pod.
    pub fn set_pod_labels(&mut self, pod: &Pod, labels: BTreeMap<String, String>) -> Result<Pod> {
        let dir = self.cluster_state_dir.clone();
        let current = self
            .pods
            .iter_mut()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
            .ok_or_else(|| TestbedError::UnknownPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })?;
        current.labels = labels;
        cluster_state::write_pod(&dir, current)?;
        Ok(current.clone())
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
