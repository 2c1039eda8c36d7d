//! What a testbed should contain: Kubernetes namespaces, nodes, and the pods on each node.

use std::collections::BTreeMap;

/// The namespace label that turns the mesh on for a namespace's pods.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// A Kubernetes namespace and its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// The namespace's name.
    pub name: String,
    /// Its labels (`nodemesh.io/mesh: enabled` meshes it).
    pub labels: BTreeMap<String, String>,
}

impl NamespaceSpec {
    /// A namespace without labels (not meshed).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            labels: BTreeMap::new(),
        }
    }

    /// A namespace labelled `nodemesh.io/mesh: enabled`.
    pub fn meshed(name: &str) -> Self {
        Self::new(name).with_label(MESH_LABEL, "enabled")
    }

    /// Adds a label.
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// A pod to create: its namespace, name, service account and labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's Kubernetes namespace (must be in the topology).
    pub namespace: String,
    /// The pod's name, unique within its namespace.
    pub name: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// A readiness probe `httpGet` on (port, path) in its container spec: what the kubelet
    /// of a real node would request from the node's address.
    pub http_probe: Option<(u16, String)>,
}

impl PodSpec {
    /// A pod labelled `app: <name>` running as a service account named like the pod.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service_account: name.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            http_probe: None,
        }
    }

    /// Gives its container a readiness probe `httpGet` on `port` and `path`.
    pub fn with_http_probe(mut self, port: u16, path: &str) -> Self {
        self.http_probe = Some((port, path.to_owned()));
        self
    }

    /// Adds a label.
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets the service account.
    pub fn with_service_account(mut self, service_account: &str) -> Self {
        self.service_account = service_account.to_owned();
        self
    }
}

/// A node (a network namespace with its own agent) and the pods scheduled on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's name (`spec.nodeName` of its pods).
    pub name: String,
    /// The pods scheduled on it.
    pub pods: Vec<PodSpec>,
}

impl NodeSpec {
    /// A node with these pods.
    pub fn new(name: &str, pods: Vec<PodSpec>) -> Self {
        Self {
            name: name.to_owned(),
            pods,
        }
    }
}

/// The whole cluster: namespaces and nodes (named `node1`, `node2`, ... by convention).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologySpec {
    /// The Kubernetes namespaces.
    pub namespaces: Vec<NamespaceSpec>,
    /// The nodes; node k (1-based, in this order) gets 198.18.0.k.
    pub nodes: Vec<NodeSpec>,
}

impl TopologySpec {
    /// [`TopologySpec::standard`] plus namespace `nodemesh-system` (not meshed) with pod `ca`
    /// (ServiceAccount `nodemesh-ca`, the chart's) on node1, where
    /// [`crate::Testbed::start_ca`] runs the CA as its Deployment would.
    pub fn standard_with_ca() -> Self {
        let mut topology = Self::standard();
        topology
            .namespaces
            .push(NamespaceSpec::new("nodemesh-system"));
        topology.nodes[0]
            .pods
            .push(PodSpec::new("nodemesh-system", "ca").with_service_account("nodemesh-ca"));
        topology
    }

    /// Two nodes; namespace `mesh` (meshed) and `plain` (not);
    /// node1: mesh/client-a, mesh/server-a, plain/outsider; node2: mesh/client-b, mesh/server-b.
    pub fn standard() -> Self {
        Self {
            namespaces: vec![NamespaceSpec::meshed("mesh"), NamespaceSpec::new("plain")],
            nodes: vec![
                NodeSpec::new(
                    "node1",
                    vec![
                        PodSpec::new("mesh", "client-a"),
                        PodSpec::new("mesh", "server-a"),
                        PodSpec::new("plain", "outsider"),
                    ],
                ),
                NodeSpec::new(
                    "node2",
                    vec![
                        PodSpec::new("mesh", "client-b"),
                        PodSpec::new("mesh", "server-b"),
                    ],
                ),
            ],
        }
    }
}
