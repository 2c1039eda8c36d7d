//! What the agent keeps of each Kubernetes object, and the transforms that make it from what
//! the API server (or a manifest) sends. An agent holds every pod and Service of the cluster,
//! so only the fields the mesh reads survive the transform (no managedFields, container specs
//! or full status), and repetitive strings are shared through an [`Interner`]:
//! - any pod that can own a meshed address: its addresses, namespace, name, service account,
//!   node and workload name ([`WorkloadPod`]); pods that can never be meshed as they stand
//!   (opted out, host network, finished, no address) are not kept at all. No labels: no
//!   policy or route selects a remote pod by label; the workload name is read from
//!   `app.kubernetes.io/name` or `app` here.
//! - this node's pods: what enrolment, identities and AuthorizationPolicy selectors need,
//!   with the kubelet's probe targets ([`LocalPod`]);
//! - Services: virtual addresses and TCP ports ([`ServiceInfo`]); EndpointSlices: their
//!   Service, address family, TCP ports and ready, non-terminating addresses ([`SliceInfo`]).
//!
//! The API watches and the manifest directory both use these transforms, so both sources
//! hold the same representation.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Pod, Probe, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    intern::Interner,
    labels::{self, InboundUdp, InvalidNamespaceLabel, PeerAuthentication, label},
    zone_policy::{self, InvalidZonePolicy, ZonePolicy},
};

/// EndpointSlice label naming the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name`: how the agent keys namespaced objects and how operators name them (a
/// Kubernetes name never contains `/`).
pub fn object_key(meta: &ObjectMeta) -> Option<String> {
    Some(format!(
        "{}/{}",
        meta.namespace.as_deref()?,
        meta.name.as_deref()?
    ))
}

/// A Namespace as the mesh reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    /// Label `nodemesh.io/mesh=enabled`.
    pub meshed: bool,
    pub peer_authentication: PeerAuthentication,
    pub inbound_udp: InboundUdp,
}

/// The namespace's mesh labels; None without a name, Err with an invalid label.
pub fn namespace_info(
    namespace: &Namespace,
) -> Option<Result<NamespaceInfo, InvalidNamespaceLabel>> {
    let name = namespace.metadata.name.clone()?;
    let meshed = labels::opted_in(namespace);
    let info = || {
        Ok(NamespaceInfo {
            name,
            meshed,
            peer_authentication: labels::peer_authentication(namespace)?,
            inbound_udp: labels::inbound_udp(namespace)?,
        })
    };
    Some(info())
}

/// A pod anywhere in the cluster that can own a meshed address: who it is, for HBONE, metrics
/// and access logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadPod {
    /// `namespace/name`.
    pub key: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    pub node: Arc<str>,
    /// What metrics call the pod's workload.
    pub workload: Arc<str>,
    pub ips: Box<[IpAddr]>,
}

impl WorkloadPod {
    pub fn name(&self) -> &str {
        self.key
            .split_once('/')
            .map_or(&*self.key, |(_, name)| name)
    }
}

/// The pod as a possible mesh member (its namespace decides later), or None when it can never
/// be one as it stands: opted out, host network, finished, without an address or a name.
pub fn workload_pod(pod: &Pod, strings: &mut Interner) -> Option<WorkloadPod> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if labels::excluded(
        pod.metadata.labels.as_ref(),
        spec.and_then(|s| s.host_network),
        status.and_then(|s| s.phase.as_deref()),
    ) {
        return None;
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return None;
    }
    let key: Arc<str> = Arc::from(object_key(&pod.metadata)?);
    let workload = match workload_label(pod.metadata.labels.as_ref()) {
        Some(label) => strings.intern(label),
        // Named after the pod itself: share the key's allocation rather than a new one.
        None => Arc::from(pod.metadata.name.as_deref()?),
    };
    Some(WorkloadPod {
        namespace: strings.intern(pod.metadata.namespace.as_deref()?),
        service_account: strings.intern(service_account(pod)),
        node: strings.intern(spec.and_then(|s| s.node_name.as_deref()).unwrap_or("")),
        workload,
        ips: ips.into_boxed_slice(),
        key,
    })
}

/// A pod of this node: what enrolment, identities and AuthorizationPolicy selectors read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: Option<String>,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    pub phase: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Where the kubelet probes the pod (readiness, liveness and startup probes of every
    /// container, named ports resolved), deduplicated.
    pub probes: Vec<ProbeTarget>,
}

impl LocalPod {
    /// What metrics call the pod's workload: label `app.kubernetes.io/name`, else `app`, else
    /// the pod's name.
    pub fn workload(&self) -> &str {
        workload_label(Some(&self.labels)).unwrap_or(&self.name)
    }
}

/// A port the kubelet sends probes to, and how it probes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ProbeTarget {
    pub port: u16,
    pub handler: ProbeHandler,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeHandler {
    /// `httpGet` to this path (`/` when unset), over TLS when the scheme is HTTPS.
    Http { path: String, https: bool },
    /// `tcpSocket`: a connection and nothing else.
    Tcp,
    /// `grpc`: the gRPC health checking protocol.
    Grpc,
}

/// This node's pod as enrolment reads it; None without a name or namespace.
pub fn local_pod(pod: &Pod) -> Option<LocalPod> {
    let spec = pod.spec.as_ref();
    // Init containers count only when they keep running (`restartPolicy: Always`, sidecars):
    // the kubelet probes no other init container.
    let mut probes: Vec<ProbeTarget> = spec
        .into_iter()
        .flat_map(|s| {
            let sidecars = s
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            s.containers.iter().chain(sidecars)
        })
        .flat_map(container_probes)
        .collect();
    probes.sort();
    probes.dedup();
    Some(LocalPod {
        uid: pod.metadata.uid.clone(),
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        service_account: service_account(pod).to_owned(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network) == Some(true),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        ips: pod_ips(pod),
        probes,
    })
}

/// The probes of one container; `exec` probes use no port, and a probe whose port cannot be
/// resolved is left out (the kubelet cannot run it either).
fn container_probes(container: &Container) -> Vec<ProbeTarget> {
    [
        &container.readiness_probe,
        &container.liveness_probe,
        &container.startup_probe,
    ]
    .into_iter()
    .flatten()
    .filter_map(|probe| probe_target(container, probe))
    .collect()
}

fn probe_target(container: &Container, probe: &Probe) -> Option<ProbeTarget> {
    if let Some(http) = &probe.http_get {
        return Some(ProbeTarget {
            port: container_port(container, &http.port)?,
            handler: ProbeHandler::Http {
                path: probe_path(http.path.as_deref()),
                https: http
                    .scheme
                    .as_deref()
                    .is_some_and(|s| s.eq_ignore_ascii_case("https")),
            },
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        return Some(ProbeTarget {
            port: container_port(container, &tcp.port)?,
            handler: ProbeHandler::Tcp,
        });
    }
    let grpc = probe.grpc.as_ref()?;
    Some(ProbeTarget {
        port: u16::try_from(grpc.port).ok().filter(|p| *p != 0)?,
        handler: ProbeHandler::Grpc,
    })
}

/// The path the kubelet requests: the spec's, without its query, `/` when empty.
fn probe_path(path: Option<&str>) -> String {
    let path = path.unwrap_or_default();
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn container_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).ok().filter(|p| *p != 0),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// A Service as resolution reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    /// `namespace/name`.
    pub key: Arc<str>,
    /// Its ClusterIPs (both of a dual-stack Service); none for headless and ExternalName.
    pub virtual_ips: Box<[IpAddr]>,
    /// Its TCP ports.
    pub ports: Box<[ServicePortInfo]>,
    /// How its clients weigh zones, or what is wrong with its annotations (the index then
    /// keeps the Service's last good policy).
    pub zone_policy: Result<ZonePolicy, InvalidZonePolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The port's name; the unnamed port has the empty name.
    pub name: Arc<str>,
    pub port: u16,
    /// `appProtocol`, which overrides protocol detection.
    pub app_protocol: Option<Arc<str>>,
}

pub fn service_info(service: &Service, strings: &mut Interner) -> Option<ServiceInfo> {
    let key = strings.intern(&object_key(&service.metadata)?);
    let spec = service.spec.as_ref();
    let virtual_ips: Vec<IpAddr> = match spec {
        Some(spec) if spec.type_.as_deref() != Some("ExternalName") => {
            let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
            if ips.is_empty() {
                ips.extend(spec.cluster_ip.as_ref());
            }
            // "None" (headless) and anything unparsable are not virtual addresses.
            ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
        }
        _ => Vec::new(),
    };
    let ports = spec
        .into_iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            Some(ServicePortInfo {
                name: strings.intern(port.name.as_deref().unwrap_or("")),
                port: u16::try_from(port.port).ok()?,
                app_protocol: port.app_protocol.as_deref().map(|p| strings.intern(p)),
            })
        })
        .collect();
    Some(ServiceInfo {
        key,
        virtual_ips: virtual_ips.into_boxed_slice(),
        ports,
        zone_policy: zone_policy::zone_policy(service),
    })
}

/// An EndpointSlice as resolution reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// `namespace/name` of the slice.
    pub key: Arc<str>,
    /// `namespace/name` of its Service (label `kubernetes.io/service-name`).
    pub service: Option<Arc<str>>,
    /// Address type IPv4 (else IPv6; FQDN slices keep no addresses).
    pub ipv4: bool,
    /// Its TCP ports: (name, target port number resolved for this slice's endpoints).
    pub ports: Box<[(Arc<str>, u16)]>,
    /// Addresses of endpoints that are ready (unset counts as ready, per the API) and not
    /// terminating: the only ones new connections may go to.
    pub ready: Box<[IpAddr]>,
    /// The ready endpoints that have a `hostname` (a StatefulSet's pods behind their
    /// headless Service), for DNS: `<hostname>.<service>.<namespace>.svc`.
    pub hostnames: Box<[(Box<str>, IpAddr)]>,
    /// The zone of each ready address that has one (`topology.kubernetes.io/zone` of its
    /// node, as the EndpointSlice controller writes it), sorted by address.
    pub zones: Box<[(IpAddr, Arc<str>)]>,
    /// The topology hints of each ready address that has any, sorted by address: empty
    /// unless the Service asks for topology-aware routing.
    pub hints: Box<[(IpAddr, EndpointHints)]>,
}

/// Where the EndpointSlice controller meant an endpoint to serve (`hints`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointHints {
    /// `forZones`: clients in these zones.
    pub zones: Box<[Arc<str>]>,
    /// `forNodes`: clients on these nodes (`trafficDistribution: PreferSameNode`).
    pub nodes: Box<[Arc<str>]>,
}

pub fn slice_info(slice: &EndpointSlice, strings: &mut Interner) -> Option<SliceInfo> {
    let namespace = slice.metadata.namespace.as_deref()?;
    let key = Arc::from(object_key(&slice.metadata)?);
    let service = label(&slice.metadata, SERVICE_NAME_LABEL)
        .map(|name| strings.intern(&format!("{namespace}/{name}")));
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port?).ok()?;
            Some((strings.intern(p.name.as_deref().unwrap_or("")), port))
        })
        .collect();
    let addresses = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
    let ready_endpoints = || {
        (slice.endpoints.iter().flatten())
            .filter(|_| addresses)
            .filter(|endpoint| {
                let conditions = endpoint.conditions.as_ref();
                conditions.and_then(|c| c.ready).unwrap_or(true)
                    && !conditions.and_then(|c| c.terminating).unwrap_or(false)
            })
    };
    let mut ready: Vec<IpAddr> = ready_endpoints()
        .flat_map(|endpoint| endpoint.addresses.iter())
        .filter_map(|addr| addr.parse().ok())
        .collect();
    ready.sort();
    ready.dedup();
    let hostnames: Vec<(Box<str>, IpAddr)> = ready_endpoints()
        .filter_map(|endpoint| Some((endpoint.hostname.as_deref()?, &endpoint.addresses)))
        .flat_map(|(hostname, addresses)| {
            (addresses.iter().filter_map(|a| a.parse().ok()))
                .map(|a| (Box::from(hostname.to_ascii_lowercase()), a))
        })
        .collect();
    let mut zones: Vec<(IpAddr, Arc<str>)> = ready_endpoints()
        .filter_map(|endpoint| Some((endpoint.zone.as_deref()?, &endpoint.addresses)))
        .flat_map(|(zone, addresses)| {
            let zone = strings.intern(zone);
            (addresses.iter().filter_map(|a| a.parse().ok())).map(move |a| (a, Arc::clone(&zone)))
        })
        .collect();
    zones.sort();
    zones.dedup_by(|a, b| a.0 == b.0);
    let mut hints: Vec<(IpAddr, EndpointHints)> = ready_endpoints()
        .filter_map(|endpoint| {
            let given = endpoint.hints.as_ref()?;
            let hints = EndpointHints {
                zones: (given.for_zones.iter().flatten())
                    .map(|z| strings.intern(&z.name))
                    .collect(),
                nodes: (given.for_nodes.iter().flatten())
                    .map(|n| strings.intern(&n.name))
                    .collect(),
            };
            (!hints.zones.is_empty() || !hints.nodes.is_empty())
                .then_some((hints, &endpoint.addresses))
        })
        .flat_map(|(hints, addresses)| {
            (addresses.iter().filter_map(|a| a.parse().ok())).map(move |a| (a, hints.clone()))
        })
        .collect();
    hints.sort_by_key(|(addr, _)| *addr);
    hints.dedup_by(|a, b| a.0 == b.0);
    Some(SliceInfo {
        key,
        service,
        ipv4: slice.address_type == "IPv4",
        ports,
        ready: ready.into_boxed_slice(),
        hostnames: hostnames.into_boxed_slice(),
        zones: zones.into_boxed_slice(),
        hints: hints.into_boxed_slice(),
    })
}

/// The workload label: `app.kubernetes.io/name`, else `app`.
fn workload_label(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    let labels = labels?;
    labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .map(String::as_str)
}

fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// The pod's addresses: `podIPs`, else `podIP`.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

#[cfg(test)]
mod tests;
