//! Service resolution: the connect hook captures a connection to a Service's ClusterIP before
//! kube-proxy would translate it, so the proxy picks the endpoint itself.
//!
//! For each ClusterIP (IPv4 and IPv6 of dual-stack Services) and TCP port, the ready
//! endpoints come from the Service's EndpointSlices (label `kubernetes.io/service-name`) of
//! the same address family. A Service port is matched to a slice port by name (the unnamed
//! port by the empty name): the slice carries the target port number already resolved, per
//! slice, which is how named targetPorts that differ between pods work. Endpoints that are
//! not ready, or are terminating, are never chosen for new connections. Headless Services
//! (`clusterIP: None`) have no virtual address: clients dial pod IPs directly. Choice is
//! round-robin; latency-aware balancing belongs to the L7 proxy.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::k8s::snapshot::ClusterSnapshot;

/// EndpointSlice label naming the Service it belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One port of one virtual address.
#[derive(Debug)]
struct ServicePort {
    /// `namespace/name`.
    service: String,
    /// The Service port's `appProtocol`, which overrides protocol detection.
    app_protocol: Option<String>,
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// A Service port as the L7 proxy sees it: what the client addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name`.
    pub service: String,
    pub port: u16,
    pub app_protocol: Option<String>,
}

/// One Service virtual address:port as the config dump shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServicePortView {
    pub service: String,
    pub virtual_address: SocketAddr,
    pub ready_endpoints: Vec<SocketAddr>,
}

/// What a destination address is, as far as Services go.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution<'a> {
    /// Not a Service's virtual address: dial it as it is.
    NotAService,
    /// A Service port without a ready endpoint: refuse, as kube-proxy does.
    NoReadyEndpoint {
        service: &'a str,
    },
    Endpoint {
        service: &'a str,
        addr: SocketAddr,
    },
}

#[derive(Debug, Default)]
pub struct ServiceIndex {
    by_vip: HashMap<SocketAddr, ServicePort>,
    /// Ready endpoints by (`namespace/name`, port, IPv4?), for HTTPRoute backends.
    by_name: HashMap<(String, u16, bool), Vec<SocketAddr>>,
}

impl ServiceIndex {
    pub fn build(snapshot: &ClusterSnapshot) -> Self {
        let mut by_vip = HashMap::new();
        let mut by_name = HashMap::new();
        for ((namespace, name), service) in &snapshot.services {
            let slices: Vec<&EndpointSlice> = snapshot
                .endpoint_slices
                .iter()
                .filter(|((ns, _), slice)| {
                    ns == namespace
                        && slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            == Some(name)
                })
                .map(|(_, slice)| slice)
                .collect();
            for vip in virtual_addresses(service) {
                for (port_name, port, app_protocol) in tcp_ports(service) {
                    let endpoints = ready_endpoints(&slices, vip, port_name);
                    let service = format!("{namespace}/{name}");
                    by_name.insert((service.clone(), port, vip.is_ipv4()), endpoints.clone());
                    by_vip.insert(
                        SocketAddr::new(vip, port),
                        ServicePort {
                            service,
                            app_protocol: app_protocol.map(str::to_owned),
                            endpoints,
                            next: AtomicUsize::new(0),
                        },
                    );
                }
            }
        }
        Self { by_vip, by_name }
    }

    /// Carries each virtual port's round-robin position over from `previous`, so rebuilding
    /// the index (on any change in the cluster) does not send the next connections to the
    /// first endpoint again.
    pub fn continuing(self, previous: &ServiceIndex) -> Self {
        for (vip, port) in &self.by_vip {
            if let Some(old) = previous.by_vip.get(vip) {
                port.next
                    .store(old.next.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        self
    }

    /// Resolves `destination`, choosing the next ready endpoint when it is a Service port.
    pub fn resolve(&self, destination: SocketAddr) -> Resolution<'_> {
        let Some(port) = self.by_vip.get(&destination) else {
            return Resolution::NotAService;
        };
        if port.endpoints.is_empty() {
            return Resolution::NoReadyEndpoint {
                service: &port.service,
            };
        }
        let index = port.next.fetch_add(1, Ordering::Relaxed) % port.endpoints.len();
        Resolution::Endpoint {
            service: &port.service,
            addr: port.endpoints[index],
        }
    }

    /// The Service port behind a virtual address, if `destination` is one.
    pub fn frontend(&self, destination: SocketAddr) -> Option<Frontend> {
        self.by_vip.get(&destination).map(|port| Frontend {
            service: port.service.clone(),
            port: destination.port(),
            app_protocol: port.app_protocol.clone(),
        })
    }

    /// The ready endpoints of `service` (`namespace/name`) on `port`, in one address family.
    pub fn endpoints(&self, service: &str, port: u16, ipv4: bool) -> &[SocketAddr] {
        self.by_name
            .get(&(service.to_owned(), port, ipv4))
            .map_or(&[], Vec::as_slice)
    }

    /// Every ready endpoint of every Service.
    pub fn all_endpoints(&self) -> HashSet<SocketAddr> {
        self.by_name.values().flatten().copied().collect()
    }

    /// Every virtual address:port with its ready endpoints, for the config dump.
    pub fn views(&self) -> Vec<ServicePortView> {
        let mut views: Vec<ServicePortView> = self
            .by_vip
            .iter()
            .map(|(vip, port)| ServicePortView {
                service: port.service.clone(),
                virtual_address: *vip,
                ready_endpoints: port.endpoints.clone(),
            })
            .collect();
        views.sort_by(|a, b| (&a.service, a.virtual_address).cmp(&(&b.service, b.virtual_address)));
        views
    }
}

fn virtual_addresses(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_ref());
    }
    // "None" (headless) and anything unparsable are not virtual addresses.
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// (port name, port, appProtocol) of the Service's TCP ports; the unnamed port has the
/// empty name.
fn tcp_ports(service: &Service) -> Vec<(&str, u16, Option<&str>)> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            let number = u16::try_from(port.port).ok()?;
            Some((
                port.name.as_deref().unwrap_or(""),
                number,
                port.app_protocol.as_deref(),
            ))
        })
        .collect()
}

fn ready_endpoints(slices: &[&EndpointSlice], vip: IpAddr, port_name: &str) -> Vec<SocketAddr> {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut endpoints: Vec<SocketAddr> = slices
        .iter()
        .filter(|slice| slice.address_type == family)
        .filter_map(|slice| {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| {
                    p.name.as_deref().unwrap_or("") == port_name
                        && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                })?
                .port
                .and_then(|p| u16::try_from(p).ok())?;
            Some((*slice, port))
        })
        .flat_map(|(slice, port)| {
            slice
                .endpoints
                .iter()
                .flatten()
                .filter(|endpoint| {
                    let conditions = endpoint.conditions.as_ref();
                    // Unset `ready` means ready (API convention); terminating never is.
                    conditions.and_then(|c| c.ready).unwrap_or(true)
                        && !conditions.and_then(|c| c.terminating).unwrap_or(false)
                })
                .flat_map(|endpoint| endpoint.addresses.iter())
                .filter_map(move |addr| addr.parse::<IpAddr>().ok())
                .map(move |ip| SocketAddr::new(ip, port))
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use k8s_openapi::{
        api::{
            core::v1::{ServicePort as K8sServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    };

    use super::*;

    fn service(name: &str, cluster_ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ips.first().map(|ip| (*ip).to_owned()),
                cluster_ips: Some(cluster_ips.iter().map(|ip| (*ip).to_owned()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, target)| K8sServicePort {
                            name: (!name.is_empty()).then(|| (*name).to_owned()),
                            port: *port,
                            target_port: Some(match target.parse::<i32>() {
                                Ok(number) => IntOrString::Int(number),
                                Err(_) => IntOrString::String((*target).to_owned()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An EndpointSlice of `service`: endpoints are (address, ready, terminating, node).
    fn slice(
        name: &str,
        service: &str,
        family: &str,
        ports: &[(&str, i32)],
        endpoints: &[(&str, bool, bool, &str)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_owned(),
                    service.to_owned(),
                )])),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some((*name).to_owned()),
                        port: Some(*port),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(addr, ready, terminating, node)| Endpoint {
                        addresses: vec![(*addr).to_owned()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            serving: Some(*ready || *terminating),
                            terminating: Some(*terminating),
                        }),
                        node_name: Some((*node).to_owned()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn index(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ServiceIndex {
        let mut snapshot = ClusterSnapshot::default();
        for s in services {
            let key = ("shop".to_owned(), s.metadata.name.clone().unwrap());
            snapshot.services.insert(key, s);
        }
        for s in slices {
            let key = ("shop".to_owned(), s.metadata.name.clone().unwrap());
            snapshot.endpoint_slices.insert(key, s);
        }
        ServiceIndex::build(&snapshot)
    }

    /// Every endpoint the index hands out for `vip` over many picks.
    fn picks(index: &ServiceIndex, vip: &str) -> BTreeSet<String> {
        (0..20)
            .filter_map(|_| match index.resolve(vip.parse().unwrap()) {
                Resolution::Endpoint { addr, .. } => Some(addr.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn named_and_numeric_target_ports_several_ports_and_endpoints_on_all_nodes() {
        let web = service(
            "web",
            &["10.96.0.10"],
            &[("http", 80, "http"), ("admin", 9000, "9001")],
        );
        // The named port resolves to 8080 on two pods and 8081 on a third: two slices.
        let a = slice(
            "web-a",
            "web",
            "IPv4",
            &[("http", 8080), ("admin", 9001)],
            &[
                ("10.0.1.1", true, false, "node1"),
                ("10.0.2.1", true, false, "node2"),
            ],
        );
        let b = slice(
            "web-b",
            "web",
            "IPv4",
            &[("http", 8081), ("admin", 9001)],
            &[("10.0.3.1", true, false, "node3")],
        );
        let index = index(vec![web], vec![a, b]);
        assert_eq!(
            picks(&index, "10.96.0.10:80"),
            BTreeSet::from([
                "10.0.1.1:8080".into(),
                "10.0.2.1:8080".into(),
                "10.0.3.1:8081".into()
            ])
        );
        assert_eq!(
            picks(&index, "10.96.0.10:9000"),
            BTreeSet::from([
                "10.0.1.1:9001".into(),
                "10.0.2.1:9001".into(),
                "10.0.3.1:9001".into()
            ])
        );
        assert_eq!(
            index.resolve("10.96.0.10:81".parse().unwrap()),
            Resolution::NotAService
        );
        assert_eq!(
            index.resolve("10.0.1.1:8080".parse().unwrap()),
            Resolution::NotAService,
            "pod addresses are dialled as they are"
        );
    }

    #[test]
    fn a_rebuilt_index_continues_the_rotation() {
        let build = || {
            let web = service("web", &["10.96.0.10"], &[("", 80, "8080")]);
            let endpoints = slice(
                "web-a",
                "web",
                "IPv4",
                &[("", 8080)],
                &[
                    ("10.0.1.1", true, false, "n"),
                    ("10.0.1.2", true, false, "n"),
                ],
            );
            index(vec![web], vec![endpoints])
        };
        let vip = "10.96.0.10:80".parse().unwrap();
        let first = build();
        let Resolution::Endpoint { addr: before, .. } = first.resolve(vip) else {
            panic!("resolves")
        };
        let second = build().continuing(&first);
        let Resolution::Endpoint { addr: after, .. } = second.resolve(vip) else {
            panic!("resolves")
        };
        assert_ne!(before, after);
    }

    #[test]
    fn terminating_and_unready_endpoints_are_not_chosen() {
        let web = service("web", &["10.96.0.10"], &[("", 80, "8080")]);
        let endpoints = slice(
            "web-a",
            "web",
            "IPv4",
            &[("", 8080)],
            &[
                ("10.0.1.1", true, false, "node1"),
                ("10.0.1.2", false, true, "node1"),
                ("10.0.1.3", false, false, "node2"),
            ],
        );
        let index = index(vec![web], vec![endpoints]);
        assert_eq!(
            picks(&index, "10.96.0.10:80"),
            BTreeSet::from(["10.0.1.1:8080".into()])
        );

        let none_ready = slice(
            "web-a",
            "web",
            "IPv4",
            &[("", 8080)],
            &[("10.0.1.2", false, true, "node1")],
        );
        let index = super::tests::index(
            vec![service("web", &["10.96.0.10"], &[("", 80, "8080")])],
            vec![none_ready],
        );
        assert_eq!(
            index.resolve("10.96.0.10:80".parse().unwrap()),
            Resolution::NoReadyEndpoint {
                service: "shop/web"
            }
        );
    }

    #[test]
    fn dual_stack_uses_the_family_of_the_virtual_address_and_headless_has_none() {
        let web = service("web", &["10.96.0.10", "fd00:96::10"], &[("", 80, "8080")]);
        let v4 = slice(
            "web-v4",
            "web",
            "IPv4",
            &[("", 8080)],
            &[("10.0.1.1", true, false, "n")],
        );
        let v6 = slice(
            "web-v6",
            "web",
            "IPv6",
            &[("", 8080)],
            &[("fd00::1", true, false, "n")],
        );
        let headless = service("db", &["None"], &[("", 5432, "5432")]);
        let db = slice(
            "db-a",
            "db",
            "IPv4",
            &[("", 5432)],
            &[("10.0.1.9", true, false, "n")],
        );
        let index = index(vec![web, headless], vec![v4, v6, db]);
        assert_eq!(
            picks(&index, "10.96.0.10:80"),
            BTreeSet::from(["10.0.1.1:8080".into()])
        );
        assert_eq!(
            picks(&index, "[fd00:96::10]:80"),
            BTreeSet::from(["[fd00::1]:8080".into()])
        );
        assert_eq!(
            index.views().len(),
            2,
            "the headless service has no virtual address"
        );
    }
}
