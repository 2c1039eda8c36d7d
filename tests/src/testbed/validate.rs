//! What a testbed's names and topology must be: names usable in netns names, cgroup
//! directories and file names; nodes, namespaces and pods unique and within the address plan.

use crate::{
    error::{Result, TestbedError},
    topology::TopologySpec,
};

/// Pods get 198.18.k.(10+i): at most this many per node.
pub(super) const MAX_PODS_PER_NODE: u8 = 245;
/// Nodes are 198.18.0.k; 198.18.0.254 is the API server's.
const MAX_NODES: usize = 253;

/// The prefix is followed by the owner pid, so it must not end in a digit.
pub(super) fn check_prefix(prefix: &str) -> Result<()> {
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
pub(super) fn check_name(kind: &str, name: &str) -> Result<()> {
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

pub(super) fn validate(topo: &TopologySpec) -> Result<()> {
    if topo.nodes.is_empty() || topo.nodes.len() > MAX_NODES {
        return Err(TestbedError::Topology(format!(
            "1 to {MAX_NODES} nodes are needed"
        )));
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
