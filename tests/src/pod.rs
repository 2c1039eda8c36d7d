//! The testbed's record of a created node and pod, and the address plan they follow.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use crate::error::IoContext;

/// Node k's address on the bridge: 198.18.0.k.
pub(crate) fn node_ipv4(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, k)
}

/// Node k's IPv6 address on the bridge: fd77::k.
pub(crate) fn node_ipv6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(k))
}

/// The gateway address pods of node k use (held by every node-side pod veth): 198.18.k.1.
pub(crate) fn gateway_ipv4(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k, 1)
}

/// The IPv6 gateway of node k's pods: fd77:k::1.
pub(crate) fn gateway_ipv6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, u16::from(k), 0, 0, 0, 0, 0, 1)
}

/// Pod i (0-based) of node k: 198.18.k.(10+i).
pub(crate) fn pod_ipv4(k: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k, 10 + i)
}

/// Pod i of node k: fd77:k::(10+i), the decimal digits written as the last group (fd77:1::10).
pub(crate) fn pod_ipv6(k: u8, i: u8) -> Ipv6Addr {
    let digits = format!("{}", 10 + u16::from(i));
    let last = u16::from_str_radix(&digits, 16).unwrap_or(0x10 + u16::from(i));
    Ipv6Addr::new(0xfd77, u16::from(k), 0, 0, 0, 0, 0, last)
}

/// A node of the testbed.
#[derive(Clone, Debug)]
pub struct Node {
    pub(crate) name: String,
    pub(crate) index: u8,
    pub(crate) netns: String,
    pub(crate) next_pod: u8,
}

impl Node {
    /// The node's name (`node1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's 1-based index k.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The node's network namespace name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node's IPv4 address on the bridge.
    pub fn ipv4(&self) -> Ipv4Addr {
        node_ipv4(self.index)
    }

    /// The node's IPv6 address on the bridge.
    pub fn ipv6(&self) -> Ipv6Addr {
        node_ipv6(self.index)
    }
}

/// A pod that exists in the testbed: its identity, addresses, namespace and cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) node_index: u8,
    pub(crate) index: u8,
    pub(crate) uid: String,
    pub(crate) service_account: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) http_probe: Option<(u16, String)>,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
    pub(crate) netns: String,
    pub(crate) host_veth: String,
    pub(crate) pod_cgroup: PathBuf,
    pub(crate) container_id: String,
    pub(crate) sandbox_id: String,
    pub(crate) sandbox_pid: u32,
}

impl Pod {
    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name of the node the pod runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pod's UID (a UUID v4).
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The pod's service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The pod's labels as last written to the cluster state.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The pod's IPv6 address.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The IPv4 address of the pod's node (status.hostIP).
    pub fn host_ip(&self) -> Ipv4Addr {
        node_ipv4(self.node_index)
    }

    /// The name of the pod's network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node-side end of the pod's veth pair (in the node's namespace).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// The pod-level cgroup (`.../kubepods/besteffort/pod<uid>`).
    pub fn pod_cgroup(&self) -> &Path {
        &self.pod_cgroup
    }

    /// The app container's cgroup, where `spawn_in_pod` puts processes.
    pub fn cgroup(&self) -> PathBuf {
        self.pod_cgroup.join(&self.container_id)
    }

    /// The cgroup of the pod's sandbox (pause) process, which holds its network namespace.
    pub fn sandbox_cgroup(&self) -> PathBuf {
        self.pod_cgroup.join(&self.sandbox_id)
    }

    /// The app container's id (64 hex digits).
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The pid of the pod's pause process (its `/proc/<pid>/ns/net` is the pod's namespace).
    pub fn sandbox_pid(&self) -> u32 {
        self.sandbox_pid
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Every non-loopback address of the pod's network namespace as the kernel lists it
    /// (`ip -o addr`): its IPv4 and IPv6 addresses, the IPv6 link-local ones, any secondary.
    pub fn local_addresses(&self) -> crate::Result<Vec<IpAddr>> {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, "ip", "-o", "addr", "show"])
            .output()
            .io_context(|| format!("listing the addresses of {}", self.netns))?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace().skip(2);
                match (fields.next(), fields.next()) {
                    (Some("inet" | "inet6"), Some(cidr)) => cidr.split('/').next()?.parse().ok(),
                    _ => None,
                }
            })
            .filter(|ip: &IpAddr| !ip.is_loopback())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan() {
        assert_eq!(pod_ipv4(2, 1).to_string(), "198.18.2.11");
        assert_eq!(pod_ipv6(2, 1).to_string(), "fd77:2::11");
        assert_eq!(node_ipv6(3).to_string(), "fd77::3");
        assert_eq!(gateway_ipv6(1).to_string(), "fd77:1::1");
    }
}
