//! Which pods the CA issues a certificate for, and with which identity. Once the caller's
//! node is known (`auth`), the decision rests on the pod and its namespace as the API
//! server holds them; the request only says which pod it means:
//! - its names are valid Kubernetes names before they go into API URLs (the namespace a
//!   DNS-1123 label, the pod a DNS-1123 subdomain), and it carries the pod's UID;
//! - the pod runs on the caller's node, has that UID (not a namesake created since the agent
//!   enrolled the pod), has not finished (Succeeded, Failed), is not being deleted, and is in
//!   the mesh as the agent decides it (`k8s::labels`: its namespace labelled
//!   `nodemesh.io/mesh=enabled`, which the caller looks up and passes as `namespace_meshed`,
//!   the pod neither opted out nor on the host network);
//! - the identity is the pod's own namespace and service account.

use k8s_openapi::api::core::v1::Pod;

use crate::identity::spiffe::{SpiffeId, SpiffeIdError};
use crate::k8s::labels;

/// The longest UID accepted (Kubernetes gives pods 36-character UUIDs).
const MAX_UID: usize = 128;

/// A request that cannot name a pod (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidRequest {
    #[error(
        "namespace {0:?} is not a Kubernetes namespace name (a DNS-1123 label: 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
    )]
    Namespace(String),
    #[error(
        "pod {0:?} is not a Kubernetes pod name (a DNS-1123 subdomain: 1 to 253 lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)"
    )]
    Pod(String),
    #[error("the request carries no pod uid: the agent is older than the CA; upgrade it")]
    MissingUid,
    #[error("uid {0:?} is not a Kubernetes UID (1 to 128 letters, digits and '-')")]
    Uid(String),
}

/// Why the CA does not issue for a pod (403).
#[derive(Debug, thiserror::Error)]
pub enum Ineligible {
    #[error("runs on node {pod_node:?}, not on the caller's node {caller_node}")]
    WrongNode {
        pod_node: String,
        caller_node: String,
    },
    #[error(
        "has uid {actual}, not {requested}: it is not the pod the agent asked for (deleted and created again?)"
    )]
    OtherUid { requested: String, actual: String },
    #[error("has finished ({0})")]
    Finished(String),
    #[error("is being deleted")]
    Terminating,
    #[error("is not in the mesh: its namespace is not labelled nodemesh.io/mesh=enabled")]
    NamespaceNotMeshed,
    #[error(
        "is not in the mesh: it opted out (nodemesh.io/mesh=disabled) or uses the host network"
    )]
    Excluded,
    #[error("has no valid identity: {0}")]
    NoIdentity(SpiffeIdError),
}

/// Checks the names a request gives before they are used; returns its UID.
pub fn check_request<'a>(
    namespace: &str,
    pod: &str,
    uid: Option<&'a str>,
) -> Result<&'a str, InvalidRequest> {
    if !is_dns1123_label(namespace) {
        return Err(InvalidRequest::Namespace(namespace.to_owned()));
    }
    if !is_dns1123_subdomain(pod) {
        return Err(InvalidRequest::Pod(pod.to_owned()));
    }
    let uid = uid.ok_or(InvalidRequest::MissingUid)?;
    let valid_uid = !uid.is_empty()
        && uid.len() <= MAX_UID
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_uid {
        return Err(InvalidRequest::Uid(uid.to_owned()));
    }
    Ok(uid)
}

/// The identity the CA issues to `caller_node` for `pod` (with `uid`, as the agent enrolled
/// it), whose namespace exists and is in the mesh if `namespace_meshed`, or why it does not.
pub fn identity_for(
    pod: &Pod,
    namespace_meshed: bool,
    caller_node: &str,
    uid: &str,
    trust_domain: &str,
) -> Result<SpiffeId, Ineligible> {
    let spec = pod.spec.as_ref();
    let pod_node = spec.and_then(|s| s.node_name.as_deref());
    if pod_node != Some(caller_node) {
        return Err(Ineligible::WrongNode {
            pod_node: pod_node.unwrap_or("(not scheduled)").to_owned(),
            caller_node: caller_node.to_owned(),
        });
    }
    let actual = pod.metadata.uid.as_deref().unwrap_or_default();
    if actual != uid {
        return Err(Ineligible::OtherUid {
            requested: uid.to_owned(),
            actual: actual.to_owned(),
        });
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if let Some(phase @ ("Succeeded" | "Failed")) = phase {
        return Err(Ineligible::Finished(phase.to_owned()));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Ineligible::Terminating);
    }
    if !namespace_meshed {
        return Err(Ineligible::NamespaceNotMeshed);
    }
    if labels::excluded(
        pod.metadata.labels.as_ref(),
        spec.and_then(|s| s.host_network),
        phase,
    ) {
        return Err(Ineligible::Excluded);
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    SpiffeId::new(trust_domain, namespace, service_account).map_err(Ineligible::NoIdentity)
}

/// A DNS-1123 label, as Kubernetes requires of namespace names.
fn is_dns1123_label(text: &str) -> bool {
    text.len() <= 63 && is_label(text)
}

/// A DNS-1123 subdomain, as Kubernetes requires of pod names.
fn is_dns1123_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_label)
}

fn is_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    let inner_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => edge_ok(first) && edge_ok(last) && bytes.iter().all(inner_ok),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Namespace, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    #[test]
    fn names_that_are_not_kubernetes_names_are_refused_before_use() {
        assert_eq!(check_request("shop", "web-1.a", Some("u-1")), Ok("u-1"));
        for (namespace, pod, expected) in [
            (
                "../../api",
                "web",
                InvalidRequest::Namespace("../../api".into()),
            ),
            ("Shop", "web", InvalidRequest::Namespace("Shop".into())),
            ("", "web", InvalidRequest::Namespace(String::new())),
            ("-shop", "web", InvalidRequest::Namespace("-shop".into())),
            ("shop.x", "web", InvalidRequest::Namespace("shop.x".into())),
            (
                &"a".repeat(64),
                "web",
                InvalidRequest::Namespace("a".repeat(64)),
            ),
            (
                "shop",
                "web/../../secrets",
                InvalidRequest::Pod("web/../../secrets".into()),
            ),
            (
                "shop",
                "web?watch=1",
                InvalidRequest::Pod("web?watch=1".into()),
            ),
            ("shop", "web%2F", InvalidRequest::Pod("web%2F".into())),
            ("shop", "web..1", InvalidRequest::Pod("web..1".into())),
            ("shop", "web-", InvalidRequest::Pod("web-".into())),
            (
                "shop",
                &"a".repeat(254),
                InvalidRequest::Pod("a".repeat(254)),
            ),
        ] {
            assert_eq!(
                check_request(namespace, pod, Some("u-1")),
                Err(expected),
                "{namespace}/{pod}"
            );
        }
        assert_eq!(
            check_request("shop", "web", None),
            Err(InvalidRequest::MissingUid)
        );
        assert_eq!(
            check_request("shop", "web", Some("u/1")),
            Err(InvalidRequest::Uid("u/1".into()))
        );
        let message = check_request("shop", "a/b", Some("u"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("DNS-1123 subdomain"), "{message}");
    }

    fn meshed() -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: Some([(labels::MESH_LABEL.into(), "enabled".into())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node1".into()),
                service_account_name: Some("web".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        }
    }

    fn decide(pod: &Pod, namespace: Option<&Namespace>) -> Result<SpiffeId, String> {
        let meshed = namespace.is_some_and(labels::opted_in);
        identity_for(pod, meshed, "node1", "u-1", "cluster.local").map_err(|e| e.to_string())
    }

    #[test]
    fn the_identity_is_the_pods_own_namespace_and_service_account() {
        let id = decide(&pod(), Some(&meshed())).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        let mut default_account = pod();
        default_account.spec.as_mut().unwrap().service_account_name = None;
        assert_eq!(
            decide(&default_account, Some(&meshed()))
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/shop/sa/default"
        );
    }

    #[test]
    fn pods_of_other_nodes_namesakes_finished_deleted_and_unmeshed_pods_are_refused() {
        let namespace = meshed();
        let mut other_node = pod();
        other_node.spec.as_mut().unwrap().node_name = Some("node2".into());
        let mut namesake = pod();
        namesake.metadata.uid = Some("u-2".into());
        let mut succeeded = pod();
        succeeded.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut failed = pod();
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut deleting = pod();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        let mut opted_out = pod();
        opted_out.metadata.labels = Some([(labels::MESH_LABEL.into(), "disabled".into())].into());
        let mut host_network = pod();
        host_network.spec.as_mut().unwrap().host_network = Some(true);
        let mut unlabelled = meshed();
        unlabelled.metadata.labels = None;
        for (pod, namespace, expected) in [
            (
                &other_node,
                Some(&namespace),
                "runs on node \"node2\", not on the caller's node node1",
            ),
            (&namesake, Some(&namespace), "has uid u-2, not u-1"),
            (&succeeded, Some(&namespace), "has finished (Succeeded)"),
            (&failed, Some(&namespace), "has finished (Failed)"),
            (&deleting, Some(&namespace), "is being deleted"),
            (&pod(), Some(&unlabelled), "its namespace is not labelled"),
            (&pod(), None, "its namespace is not labelled"),
            (&opted_out, Some(&namespace), "opted out"),
            (&host_network, Some(&namespace), "host network"),
        ] {
            let refusal = decide(pod, namespace).unwrap_err();
            assert!(refusal.contains(expected), "{refusal}");
        }
    }
}
