//! Which pods on this node are meshed: the opt-in and opt-out rules.

use std::{collections::BTreeMap, net::IpAddr};

use crate::k8s::{
    compact::{LocalPod, NamespaceInfo, ProbeTarget},
    labels::{DNS_LABEL, InboundUdp, PeerAuthentication, excluded},
    snapshot::ClusterSnapshot,
};

/// A pod of this node that belongs in the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshedPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// What metrics call the pod's workload: label `app.kubernetes.io/name`, else `app`,
    /// else the pod's name.
    pub workload: String,
    pub ips: Vec<IpAddr>,
    pub peer_authentication: PeerAuthentication,
    /// Whether UDP from outside the pod is dropped (its namespace's `nodemesh.io/inbound-udp`).
    pub inbound_udp: InboundUdp,
    /// Where the kubelet probes the pod (from its containers' probes).
    pub probes: Vec<ProbeTarget>,
    /// Whether its UDP DNS is captured: unless it opts out with `nodemesh.io/dns=disabled`.
    pub dns: bool,
}

impl MeshedPod {
    /// `namespace/name`, how operators name a pod.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The meshed pods of this node (the snapshot's local pods), keyed by UID.
pub fn local_meshed_pods(snapshot: &ClusterSnapshot) -> BTreeMap<String, MeshedPod> {
    snapshot
        .local_pods
        .values()
        .filter_map(|pod| {
            let namespace = snapshot
                .namespaces
                .get(&pod.namespace)
                .filter(|ns| ns.meshed)?;
            meshed_pod(pod, namespace)
        })
        .map(|pod| (pod.uid.clone(), pod))
        .collect()
}

/// The pod as a mesh member, or None when it must not be captured: opted out, host network,
/// finished, or not yet given an IP or UID.
fn meshed_pod(pod: &LocalPod, namespace: &NamespaceInfo) -> Option<MeshedPod> {
    if excluded(
        Some(&pod.labels),
        Some(pod.host_network),
        pod.phase.as_deref(),
    ) || pod.ips.is_empty()
    {
        return None;
    }
    Some(MeshedPod {
        uid: pod.uid.clone()?,
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        service_account: pod.service_account.clone(),
        workload: pod.workload().to_owned(),
        ips: pod.ips.clone(),
        peer_authentication: namespace.peer_authentication,
        inbound_udp: namespace.inbound_udp,
        probes: pod.probes.clone(),
        dns: pod.labels.get(DNS_LABEL).map(String::as_str) != Some("disabled"),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::k8s::{
        compact,
        labels::{INBOUND_UDP_LABEL, MESH_LABEL, PEER_AUTHENTICATION_LABEL, peer_authentication},
    };

    fn namespace(name: &str, meshed: bool) -> Namespace {
        let labels = meshed.then(|| [(MESH_LABEL.to_owned(), "enabled".to_owned())].into());
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, node: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some("sa".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("198.18.1.10".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "198.18.1.10".into(),
                    },
                    PodIP {
                        ip: "fd77:1::10".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    /// The snapshot the sources make of these objects, for node1.
    fn snapshot(namespaces: Vec<Namespace>, pods: Vec<Pod>) -> ClusterSnapshot {
        ClusterSnapshot {
            namespaces: namespaces
                .iter()
                .map(|n| {
                    let info = compact::namespace_info(n).unwrap().unwrap();
                    (info.name.clone(), info)
                })
                .collect(),
            local_pods: pods
                .iter()
                .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("node1"))
                .map(|p| {
                    let pod = compact::local_pod(p).unwrap();
                    (format!("{}/{}", pod.namespace, pod.name), pod)
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn meshes_pods_of_labelled_namespaces_on_this_node_only() {
        let state = snapshot(
            vec![namespace("mesh", true), namespace("plain", false)],
            vec![
                pod("mesh", "a", "node1"),
                pod("mesh", "b", "node2"),
                pod("plain", "c", "node1"),
                pod("ghost", "d", "node1"),
            ],
        );
        let meshed = local_meshed_pods(&state);
        assert_eq!(meshed.keys().collect::<Vec<_>>(), ["uid-a"]);
        let a = &meshed["uid-a"];
        assert_eq!(a.service_account, "sa");
        assert_eq!(a.ips.len(), 2);
    }

    #[test]
    fn peer_authentication_comes_from_the_namespace_label() {
        let mut strict = namespace("locked", true);
        strict
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(PEER_AUTHENTICATION_LABEL.into(), "STRICT".into());
        let state = snapshot(
            vec![strict, namespace("open", true)],
            vec![pod("locked", "a", "node1"), pod("open", "b", "node1")],
        );
        let meshed = local_meshed_pods(&state);
        assert_eq!(
            meshed["uid-a"].peer_authentication,
            PeerAuthentication::Strict
        );
        assert_eq!(
            meshed["uid-b"].peer_authentication,
            PeerAuthentication::Permissive
        );

        let mut typo = namespace("typo", true);
        typo.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(PEER_AUTHENTICATION_LABEL.into(), "strikt".into());
        let error = peer_authentication(&typo).unwrap_err().to_string();
        assert!(error.contains("\"strikt\""), "{error}");
    }

    #[test]
    fn inbound_udp_comes_from_the_namespace_label_and_a_bad_value_is_an_error() {
        let mut denied = namespace("locked", true);
        let labels = denied.metadata.labels.as_mut().unwrap();
        labels.insert(INBOUND_UDP_LABEL.into(), "Deny".into());
        let state = snapshot(
            vec![denied, namespace("open", true)],
            vec![pod("locked", "a", "node1"), pod("open", "b", "node1")],
        );
        let meshed = local_meshed_pods(&state);
        assert_eq!(meshed["uid-a"].inbound_udp, InboundUdp::Deny);
        assert_eq!(meshed["uid-b"].inbound_udp, InboundUdp::Allow);

        let mut typo = namespace("typo", true);
        let labels = typo.metadata.labels.as_mut().unwrap();
        labels.insert(INBOUND_UDP_LABEL.into(), "drop".into());
        let error = compact::namespace_info(&typo).unwrap().unwrap_err();
        assert!(error.to_string().contains(INBOUND_UDP_LABEL), "{error}");
        assert!(error.to_string().contains("\"drop\""), "{error}");
    }

    #[test]
    fn honours_opt_out_host_network_phase_and_missing_ip() {
        let mut opted_out = pod("mesh", "out", "node1");
        opted_out.metadata.labels = Some([(MESH_LABEL.to_owned(), "disabled".to_owned())].into());
        let mut host = pod("mesh", "host", "node1");
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = pod("mesh", "done", "node1");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut pending = pod("mesh", "pending", "node1");
        pending.status.as_mut().unwrap().pod_ip = None;
        pending.status.as_mut().unwrap().pod_ips = None;
        let state = snapshot(
            vec![namespace("mesh", true)],
            vec![opted_out, host, done, pending, pod("mesh", "ok", "node1")],
        );
        assert_eq!(
            local_meshed_pods(&state).keys().collect::<Vec<_>>(),
            ["uid-ok"]
        );
    }
}
