//! The labels by which Namespaces and Pods opt into or out of the mesh, and how they are read.
//! Both sources read them through `compact.rs`, so each rule lives here once.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};

/// Label on a Namespace (`enabled`) or a Pod (`disabled`) that opts in or out.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// Label on a Pod that opts its DNS out of capture (`disabled`): its UDP queries to port 53
/// then go to its resolver untouched (docs/dns.md).
pub const DNS_LABEL: &str = "nodemesh.io/dns";

/// Label on a Namespace choosing how its meshed pods treat plaintext from outside the mesh:
/// `strict` or `permissive` (the default, as in Istio, so a namespace can be meshed before
/// all of its clients are).
pub const PEER_AUTHENTICATION_LABEL: &str = "nodemesh.io/peer-authentication";

/// Label on a Namespace choosing what happens to UDP arriving at its meshed pods from
/// outside them: `allow` (the default) or `deny`, which drops it except DNS answers (UDP from
/// port 53) and datagrams to a socket connected to their source. Meant for STRICT
/// namespaces, whose TCP it completes, and honoured in any mode (docs/security.md).
pub const INBOUND_UDP_LABEL: &str = "nodemesh.io/inbound-udp";

/// Whether a meshed pod accepts plaintext TCP from outside the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthentication {
    /// Plaintext is refused; only mTLS (HBONE) reaches the pod.
    Strict,
    /// Plaintext is delivered (and counted) alongside mTLS.
    #[default]
    Permissive,
}

/// Whether a meshed pod accepts UDP from outside it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InboundUdp {
    /// Delivered untouched (the mesh does not cover UDP).
    #[default]
    Allow,
    /// Dropped by the kernel, except DNS answers and datagrams to connected sockets.
    Deny,
}

#[derive(Debug, thiserror::Error)]
#[error("label {label}={value:?} is not one of {allowed}")]
pub struct InvalidNamespaceLabel {
    pub label: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

/// The namespace's peer-authentication mode from its label.
pub fn peer_authentication(
    namespace: &Namespace,
) -> Result<PeerAuthentication, InvalidNamespaceLabel> {
    match label(&namespace.metadata, PEER_AUTHENTICATION_LABEL) {
        None => Ok(PeerAuthentication::default()),
        Some(value) if value.eq_ignore_ascii_case("strict") => Ok(PeerAuthentication::Strict),
        Some(value) if value.eq_ignore_ascii_case("permissive") => {
            Ok(PeerAuthentication::Permissive)
        }
        Some(value) => Err(InvalidNamespaceLabel {
            label: PEER_AUTHENTICATION_LABEL,
            value: value.to_owned(),
            allowed: "\"strict\", \"permissive\"",
        }),
    }
}

/// What the namespace's pods do with inbound UDP, from its label.
pub fn inbound_udp(namespace: &Namespace) -> Result<InboundUdp, InvalidNamespaceLabel> {
    match label(&namespace.metadata, INBOUND_UDP_LABEL) {
        None => Ok(InboundUdp::default()),
        Some(value) if value.eq_ignore_ascii_case("allow") => Ok(InboundUdp::Allow),
        Some(value) if value.eq_ignore_ascii_case("deny") => Ok(InboundUdp::Deny),
        Some(value) => Err(InvalidNamespaceLabel {
            label: INBOUND_UDP_LABEL,
            value: value.to_owned(),
            allowed: "\"allow\", \"deny\"",
        }),
    }
}

/// Whether a namespace opts its pods in: label `nodemesh.io/mesh=enabled`.
pub fn opted_in(namespace: &Namespace) -> bool {
    label(&namespace.metadata, MESH_LABEL) == Some("enabled")
}

/// Whether a pod stays out of the mesh whatever its namespace says: opted out with
/// `nodemesh.io/mesh=disabled`, on the host network, or finished.
pub fn excluded(
    labels: Option<&BTreeMap<String, String>>,
    host_network: Option<bool>,
    phase: Option<&str>,
) -> bool {
    labels.and_then(|l| l.get(MESH_LABEL)).map(String::as_str) == Some("disabled")
        || host_network == Some(true)
        || matches!(phase, Some("Succeeded" | "Failed"))
}

/// The well-known label of a Node's zone (the EndpointSlice controller copies it into each
/// endpoint's `zone`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The well-known label of a Node's region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// The value of label `key`.
pub fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(key))
        .map(String::as_str)
}

/// The object's annotation `key`, if set.
pub fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|annotations| annotations.get(key))
        .map(String::as_str)
}
