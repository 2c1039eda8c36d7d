//! A testbed's pods: created (network, cgroups, pause process, then the cluster state),
//! relabelled, emptied and removed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
};

use super::{
    Testbed,
    validate::{MAX_PODS_PER_NODE, check_name},
};
use crate::{
    cgroup,
    cleanup::{Tracked, kill_and_reap, lock},
    cluster_state,
    error::{IoContext, Result, TestbedError},
    exec::Placement,
    netns,
    pod::{self, Pod},
    topology::PodSpec,
    util,
};

impl Testbed {
    /// Wires one pod: netns, veth, addresses, routes, cgroups, pause process, then its YAML.
    pub(super) fn create_pod(&mut self, node_name: &str, spec: &PodSpec) -> Result<Pod> {
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
        let mut pod = Pod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: node_name.to_owned(),
            node_index: k,
            index: i,
            service_account: spec.service_account.clone(),
            labels: spec.labels.clone(),
            http_probe: spec.http_probe.clone(),
            ipv4: pod::pod_ipv4(k, i),
            ipv6: pod::pod_ipv6(k, i),
            netns: format!("{}-{node_name}-{}-{}", self.name, spec.namespace, spec.name),
            host_veth: format!("p{i}"),
            pod_cgroup: PathBuf::new(),
            uid: String::new(),
            container_id: util::container_id()?,
            sandbox_id: util::container_id()?,
            sandbox_pid: 0,
        };
        // The API server names the pod's UID; the kubelet then makes its cgroup from it.
        pod.uid = match &self.control_plane {
            Some(api) => api.apply_pod(&cluster_state::pod_object(&pod))?,
            None => util::uuid_v4()?,
        };
        pod.pod_cgroup = pod_cgroup_root.join(format!("pod{}", pod.uid));
        self.wire_pod(&node_netns, &pod)?;
        pod.sandbox_pid = self.start_sandbox(&pod)?;
        match &self.control_plane {
            Some(api) => api.report_pod_status(&cluster_state::pod_object(&pod))?,
            None => {
                cluster_state::write_pod(&self.cluster_state_dir, &pod)?;
            }
        }
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
        match &self.control_plane {
            Some(api) => api.delete_pod(&pod, || self.stop_pod(&pod)),
            None => {
                cluster_state::delete_pod(&self.cluster_state_dir, &pod.namespace, &pod.name)?;
                self.stop_pod(&pod)
            }
        }
    }

    /// Kills every process of a pod (its sandbox included) and keeps its cgroups, network
    /// namespace and YAML: a pod whose containers all exited while the kubelet keeps its
    /// cgroup. Processes started in it later ([`Testbed::spawn_in_pod`]) bring it back.
    pub fn empty_pod(&self, pod: &Pod) -> Result<()> {
        cgroup::kill_all(&pod.pod_cgroup)?;
        self.reap_pod_processes(pod)
    }

    fn reap_pod_processes(&self, pod: &Pod) -> Result<()> {
        let key = pod.key();
        let mut res = lock(&self.shared);
        let (ours, others): (Vec<Tracked>, Vec<Tracked>) = std::mem::take(&mut res.children)
            .into_iter()
            .partition(|t| t.pod.as_deref() == Some(key.as_str()));
        res.children = others;
        drop(res);
        for mut tracked in ours {
            kill_and_reap(&mut tracked.child).io_context(|| format!("reaping {}", tracked.what))?;
        }
        Ok(())
    }

    /// Kills a removed pod's processes and removes its netns and cgroups.
    fn stop_pod(&self, pod: &Pod) -> Result<()> {
        cgroup::kill_all(&pod.pod_cgroup)?;
        self.reap_pod_processes(pod)?;
        lock(&self.shared).netns.retain(|n| n != &pod.netns);
        // Its veth pair (and the node's host routes through it) go with the namespace.
        netns::delete(&pod.netns)?;
        cgroup::remove_tree(&pod.pod_cgroup)?;
        tracing::debug!(testbed = %self.name, pod = %pod.key(), "pod removed");
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
        let updated = current.clone();
        match &self.control_plane {
            Some(api) => {
                api.apply_pod(&cluster_state::pod_object(&updated))?;
            }
            None => {
                cluster_state::write_pod(&dir, &updated)?;
            }
        }
        Ok(updated)
    }
}
