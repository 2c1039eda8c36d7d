//! The kubelet's probes of each local pod, from the Pod spec: which ports they use and what
//! they ask there. Plaintext from the node's own addresses is let past STRICT and
//! AuthorizationPolicy only when it is one of these probes (proxy/inbound/plaintext.rs), so that
//! nothing else on the node (a hostNetwork pod, NodePort traffic SNATed to the node) gets a
//! way around them.
//!
//! The probes come from the compact local pod (`k8s::compact::local_pod`: readiness,
//! liveness and startup probes of every container and of sidecar init containers, named
//! ports resolved as the kubelet does).

use std::collections::{BTreeMap, BTreeSet};

use crate::k8s::compact::{LocalPod, ProbeHandler};

/// The path of the gRPC health check the kubelet calls (`grpc.health.v1.Health/Check`).
pub const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// What the kubelet's probes do on one port of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProbePort {
    /// Paths of HTTP GET probes, as the spec gives them (query left out).
    pub http_paths: BTreeSet<String>,
    /// A gRPC health probe: `POST /grpc.health.v1.Health/Check` over HTTP/2.
    pub grpc: bool,
    /// A TCP probe: the kubelet only completes a handshake.
    pub tcp: bool,
    /// An HTTPS GET probe: its requests are inside the application's TLS.
    pub tls: bool,
}

impl ProbePort {
    /// Whether the probes' requests on this port can be told apart from other HTTP.
    pub fn has_http_probes(&self) -> bool {
        !self.http_paths.is_empty() || self.grpc
    }
}

/// The probe ports of every local pod, rebuilt with the cluster state.
#[derive(Debug, Default)]
pub struct ProbeIndex {
    /// By pod `namespace/name`, then port.
    by_pod: BTreeMap<String, BTreeMap<u16, ProbePort>>,
}

impl ProbeIndex {
    pub fn build<'a>(pods: impl Iterator<Item = &'a LocalPod>) -> Self {
        let mut by_pod = BTreeMap::new();
        for pod in pods.filter(|pod| !pod.probes.is_empty()) {
            let mut ports: BTreeMap<u16, ProbePort> = BTreeMap::new();
            for probe in &pod.probes {
                let port = ports.entry(probe.port).or_default();
                match &probe.handler {
                    ProbeHandler::Http { https: true, .. } => port.tls = true,
                    ProbeHandler::Http { path, .. } => {
                        port.http_paths.insert(path.clone());
                    }
                    ProbeHandler::Tcp => port.tcp = true,
                    ProbeHandler::Grpc => port.grpc = true,
                }
            }
            by_pod.insert(format!("{}/{}", pod.namespace, pod.name), ports);
        }
        Self { by_pod }
    }

    /// What the probes of the pod `namespace/name` do on `port`, if any use it.
    pub fn port(&self, pod: &str, port: u16) -> Option<ProbePort> {
        self.by_pod.get(pod)?.get(&port).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> LocalPod {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "mesh", "name": "web"},
            "spec": spec,
        }))
        .expect("pod");
        crate::k8s::compact::local_pod(&pod).expect("a local pod")
    }

    #[test]
    fn every_kind_of_probe_gives_its_port_and_what_it_asks() {
        let pod = pod(serde_json::json!({
            "containers": [{
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": "http"}},
                "livenessProbe": {"httpGet": {"path": "healthz", "port": 8080}},
                "startupProbe": {"tcpSocket": {"port": 9000}},
            }, {
                "name": "grpc",
                "livenessProbe": {"grpc": {"port": 9090}},
                "readinessProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS"}},
            }],
            "initContainers": [{
                "name": "sidecar",
                "restartPolicy": "Always",
                "readinessProbe": {"httpGet": {"port": 15000}},
            }, {
                "name": "setup",
                "readinessProbe": {"tcpSocket": {"port": 7000}},
            }],
        }));
        let index = ProbeIndex::build(std::iter::once(&pod));
        let http = index.port("mesh/web", 8080).expect("8080");
        assert_eq!(
            http.http_paths.iter().collect::<Vec<_>>(),
            ["/healthz", "/ready"]
        );
        assert!(!http.tcp && !http.grpc && !http.tls);
        assert!(index.port("mesh/web", 9000).expect("9000").tcp);
        assert!(index.port("mesh/web", 9090).expect("9090").grpc);
        let tls = index.port("mesh/web", 8443).expect("8443");
        assert!(tls.tls && !tls.has_http_probes());
        assert_eq!(
            index.port("mesh/web", 15000).expect("sidecar").http_paths,
            BTreeSet::from(["/".to_owned()])
        );
        assert_eq!(
            index.port("mesh/web", 7000),
            None,
            "an init container that ends"
        );
        assert_eq!(index.port("mesh/web", 80), None);
        assert_eq!(index.port("mesh/other", 8080), None);
    }

    #[test]
    fn a_named_port_the_container_does_not_declare_is_left_out() {
        let pod = pod(serde_json::json!({
            "containers": [{
                "name": "app",
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "missing"}},
                "livenessProbe": {"exec": {"command": ["true"]}},
            }],
        }));
        let index = ProbeIndex::build(std::iter::once(&pod));
        assert!(index.by_pod.is_empty(), "{index:?}");
    }
}
