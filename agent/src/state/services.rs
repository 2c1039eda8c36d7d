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

//!
//! The index is kept current event by event by the cluster source: a Service or EndpointSlice
//! event recomputes that one Service's virtual ports (keeping each port's round-robin
//! position), never the whole cluster's. A relist updates in place and then drops what it did
//! not mention.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::k8s::{
    compact::{ServiceInfo, SliceInfo},
    snapshot::ServiceStore,
};

/// The index as the proxies and the cluster source share it.
pub type SharedServices = Arc<RwLock<ServiceIndex>>;

/// One port of one virtual address.
#[derive(Debug)]
struct ServicePort {
    /// `namespace/name`.
    service: Arc<str>,
    /// The Service port's `appProtocol`, which overrides protocol detection.
    app_protocol: Option<Arc<str>>,
    endpoints: Box<[SocketAddr]>,
    /// `zones[i]` is `endpoints[i]`'s zone; empty when no endpoint has one.
    zones: Box<[Option<Arc<str>>]>,
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

/// A Service and its EndpointSlices, as last seen, with the relist that last mentioned each.
#[derive(Debug, Default)]
struct ServiceEntry {
    service: Option<(ServiceInfo, u64)>,
    slices: HashMap<Arc<str>, (SliceInfo, u64)>,
    /// The virtual address:ports published for it.
    published: Vec<SocketAddr>,
}

#[derive(Debug, Default)]
pub struct ServiceIndex {
    /// By `namespace/name` of the Service.
    services: HashMap<Arc<str>, ServiceEntry>,
    /// The Service each EndpointSlice (by `namespace/name`) belongs to.
    slice_owner: HashMap<Arc<str>, Arc<str>>,
    by_vip: HashMap<SocketAddr, ServicePort>,
    /// How many virtual ports list each endpoint.
    endpoint_refs: HashMap<SocketAddr, u32>,
    service_epoch: u64,
    slice_epoch: u64,
    /// This node's zone, when its Node has one.
    local_zone: Option<Arc<str>>,
}

impl ServiceIndex {
    /// This node's zone, when its Node has one: the zone clients here prefer.
    pub fn local_zone(&self) -> Option<&Arc<str>> {
        self.local_zone.as_ref()
    }

    pub fn shared() -> SharedServices {
        Arc::default()
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
            service: port.service.to_string(),
            port: destination.port(),
            app_protocol: port.app_protocol.as_deref().map(str::to_owned),
        })
    }

    /// The ready endpoints of `service` (`namespace/name`) on `port`, in one address family,
    /// and their zones (`zones[i]` is `endpoints[i]`'s; empty when none has one).
    pub fn endpoints(
        &self,
        service: &str,
        port: u16,
        ipv4: bool,
    ) -> (&[SocketAddr], &[Option<Arc<str>>]) {
        let Some((info, _)) = self.services.get(service).and_then(|e| e.service.as_ref()) else {
            return (&[], &[]);
        };
        info.virtual_ips
            .iter()
            .find(|ip| ip.is_ipv4() == ipv4)
            .and_then(|ip| self.by_vip.get(&SocketAddr::new(*ip, port)))
            .map_or((&[], &[]), |p| (&p.endpoints, &p.zones))
    }

    /// The addresses DNS gives for the Service `namespace/name`: its ClusterIPs, or, headless,
    /// the ready endpoints of its slices (sorted, deduplicated). `None` when there is no such
    /// Service.
    pub fn dns_addresses(&self, service: &str) -> Option<Vec<IpAddr>> {
        let entry = self.services.get(service)?;
        let (info, _) = entry.service.as_ref()?;
        if !info.virtual_ips.is_empty() {
            return Some(info.virtual_ips.to_vec());
        }
        let mut ready: Vec<IpAddr> = entry
            .slices
            .values()
            .flat_map(|(slice, _)| slice.ready.iter().copied())
            .collect();
        ready.sort();
        ready.dedup();
        Some(ready)
    }

    /// The ready addresses of the endpoints named `hostname` behind Service `service`
    /// (`<hostname>.<service>.<namespace>.svc`); `None` when there is no such Service.
    pub fn dns_hostname_addresses(&self, service: &str, hostname: &str) -> Option<Vec<IpAddr>> {
        let entry = self.services.get(service)?;
        entry.service.as_ref()?;
        let slices = entry.slices.values().map(|(slice, _)| slice);
        let named = slices.flat_map(|slice| slice.hostnames.iter());
        let found = named
            .filter(|(name, _)| **name == *hostname)
            .map(|(_, a)| *a);
        Some(found.collect())
    }

    /// Whether the Service `namespace/name` exists.
    pub fn contains(&self, service: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|e| e.service.is_some())
    }

    /// Whether any Service port lists `endpoint` as ready.
    pub fn has_endpoint(&self, endpoint: &SocketAddr) -> bool {
        self.endpoint_refs.contains_key(endpoint)
    }

    /// (Services, virtual address:ports, ready endpoints listed).
    pub fn counts(&self) -> (usize, usize, usize) {
        let services = self
            .services
            .values()
            .filter(|e| e.service.is_some())
            .count();
        let endpoints = self.by_vip.values().map(|p| p.endpoints.len()).sum();
        (services, self.by_vip.len(), endpoints)
    }

    /// Every virtual address:port with its ready endpoints, for the config dump.
    pub fn views(&self) -> Vec<ServicePortView> {
        let mut views: Vec<ServicePortView> = self
            .by_vip
            .iter()
            .map(|(vip, port)| ServicePortView {
                service: port.service.to_string(),
                virtual_address: *vip,
                ready_endpoints: port.endpoints.to_vec(),
            })
            .collect();
        views.sort_by(|a, b| (&a.service, a.virtual_address).cmp(&(&b.service, b.virtual_address)));
        views
    }

    /// Adds or replaces the Service `key` (`namespace/name`); None removes it.
    pub fn upsert_service(&mut self, key: &str, service: Option<ServiceInfo>) {
        match service {
            Some(service) => {
                let entry = self.services.entry(Arc::clone(&service.key)).or_default();
                entry.service = Some((service, self.service_epoch));
            }
            None => match self.services.get_mut(key) {
                Some(entry) => entry.service = None,
                None => return,
            },
        }
        self.recompute(key);
    }

    /// Adds or replaces the EndpointSlice `key` (`namespace/name`); None removes it.
    pub fn upsert_slice(&mut self, key: &str, slice: Option<SliceInfo>) {
        if let Some(owner) = self.slice_owner.remove(key) {
            if let Some(entry) = self.services.get_mut(&owner) {
                entry.slices.remove(key);
            }
            self.recompute(&owner);
        }
        let Some(slice) = slice else {
            return;
        };
        // A slice without its Service's label serves no Service.
        let Some(owner) = slice.service.clone() else {
            return;
        };
        self.slice_owner
            .insert(Arc::clone(&slice.key), Arc::clone(&owner));
        self.services
            .entry(Arc::clone(&owner))
            .or_default()
            .slices
            .insert(Arc::clone(&slice.key), (slice, self.slice_epoch));
        self.recompute(&owner);
    }

    /// A relist of Services starts: what it does not mention by `end_service_relist` is gone.
    pub fn begin_service_relist(&mut self) {
        self.service_epoch += 1;
    }

    pub fn end_service_relist(&mut self) {
        let epoch = self.service_epoch;
        let stale: Vec<Arc<str>> = self
            .services
            .iter()
            .filter(|(_, e)| e.service.as_ref().is_some_and(|(_, at)| *at != epoch))
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in stale {
            self.upsert_service(&key, None);
        }
    }

    /// A relist of EndpointSlices starts: what it does not mention by `end_slice_relist` is
    /// gone.
    pub fn begin_slice_relist(&mut self) {
        self.slice_epoch += 1;
    }

    pub fn end_slice_relist(&mut self) {
        let epoch = self.slice_epoch;
        let stale: Vec<Arc<str>> = self
            .services
            .values()
            .flat_map(|e| e.slices.iter())
            .filter(|(_, (_, at))| *at != epoch)
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in stale {
            self.upsert_slice(&key, None);
        }
    }

    /// Publishes the virtual ports of the Service `key` again from its spec and slices.
    fn recompute(&mut self, key: &str) {
        let Some(entry) = self.services.get_mut(key) else {
            return;
        };
        let mut positions = HashMap::new();
        for vip in std::mem::take(&mut entry.published) {
            if let Some(port) = self.by_vip.remove(&vip) {
                for endpoint in &port.endpoints {
                    release(&mut self.endpoint_refs, endpoint);
                }
                positions.insert(vip, port.next.into_inner());
            }
        }
        if entry.service.is_none() && entry.slices.is_empty() {
            self.services.remove(key);
            return;
        }
        let Some((service, _)) = &entry.service else {
            return;
        };
        let slices: Vec<&SliceInfo> = entry.slices.values().map(|(slice, _)| slice).collect();
        for vip in &service.virtual_ips {
            for port in &service.ports {
                let addr = SocketAddr::new(*vip, port.port);
                let (endpoints, zones) = ready_endpoints(&slices, *vip, &port.name);
                for endpoint in &endpoints {
                    *self.endpoint_refs.entry(*endpoint).or_default() += 1;
                }
                entry.published.push(addr);
                self.by_vip.insert(
                    addr,
                    ServicePort {
                        service: Arc::clone(&service.key),
                        app_protocol: port.app_protocol.clone(),
                        endpoints: endpoints.into_boxed_slice(),
                        zones: zones.into_boxed_slice(),
                        // The rotation goes on where it was: a change does not send the next
                        // connections to the first endpoint again.
                        next: AtomicUsize::new(positions.get(&addr).copied().unwrap_or(0)),
                    },
                );
            }
        }
    }
}

fn release(refs: &mut HashMap<SocketAddr, u32>, endpoint: &SocketAddr) {
    if let Some(count) = refs.get_mut(endpoint) {
        *count -= 1;
        if *count == 0 {
            refs.remove(endpoint);
        }
    }
}

/// The ready endpoints for one virtual address and Service port: from the slices of the
/// address's family, at the target port each slice gives the port's name; with their zones
/// (none at all when no endpoint has one).
fn ready_endpoints(
    slices: &[&SliceInfo],
    vip: IpAddr,
    port_name: &str,
) -> (Vec<SocketAddr>, Vec<Option<Arc<str>>>) {
    let mut endpoints: Vec<(SocketAddr, Option<Arc<str>>)> = slices
        .iter()
        .filter(|slice| slice.ipv4 == vip.is_ipv4())
        .filter_map(|slice| {
            let (_, port) = slice.ports.iter().find(|(name, _)| &**name == port_name)?;
            Some((slice, *port))
        })
        .flat_map(|(slice, port)| {
            slice.ready.iter().map(move |ip| {
                let zone = slice
                    .zones
                    .binary_search_by(|(addr, _)| addr.cmp(ip))
                    .ok()
                    .map(|i| Arc::clone(&slice.zones[i].1));
                (SocketAddr::new(*ip, port), zone)
            })
        })
        .collect();
    endpoints.sort_by_key(|(addr, _)| *addr);
    endpoints.dedup_by_key(|(addr, _)| *addr);
    let zoned = endpoints.iter().any(|(_, zone)| zone.is_some());
    let zones = if zoned {
        endpoints.iter().map(|(_, zone)| zone.clone()).collect()
    } else {
        Vec::new()
    };
    (endpoints.into_iter().map(|(addr, _)| addr).collect(), zones)
}

/// A cluster source keeps the index current through this.
impl ServiceStore for ServiceIndex {
    fn begin_service_relist(&mut self) {
        ServiceIndex::begin_service_relist(self);
    }
    fn upsert_service(&mut self, key: &str, service: Option<ServiceInfo>) {
        ServiceIndex::upsert_service(self, key, service);
    }
    fn end_service_relist(&mut self) {
        ServiceIndex::end_service_relist(self);
    }
    fn begin_slice_relist(&mut self) {
        ServiceIndex::begin_slice_relist(self);
    }
    fn upsert_slice(&mut self, key: &str, slice: Option<SliceInfo>) {
        ServiceIndex::upsert_slice(self, key, slice);
    }
    fn end_slice_relist(&mut self) {
        ServiceIndex::end_slice_relist(self);
    }
    fn counts(&self) -> (usize, usize, usize) {
        ServiceIndex::counts(self)
    }
    fn set_local_zone(&mut self, zone: Option<Arc<str>>) {
        if self.local_zone != zone {
            tracing::info!(zone = zone.as_deref().unwrap_or("none"), "this node's zone");
            self.local_zone = zone;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use k8s_openapi::{
        api::{
            core::v1::{Service, ServicePort as K8sServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    };

    use super::*;
    use crate::k8s::{
        compact::{self, SERVICE_NAME_LABEL},
        intern::Interner,
    };

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

    /// The index after these objects' watch events, through the sources' transforms.
    fn index(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ServiceIndex {
        let mut index = ServiceIndex::default();
        apply(&mut index, services, slices);
        index
    }

    fn apply(index: &mut ServiceIndex, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let mut strings = Interner::default();
        for s in services {
            let info = compact::service_info(&s, &mut strings).unwrap();
            index.upsert_service(&info.key.clone(), Some(info));
        }
        for s in slices {
            let info = compact::slice_info(&s, &mut strings).unwrap();
            index.upsert_slice(&info.key.clone(), Some(info));
        }
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
    fn an_update_continues_the_rotation_and_a_relist_drops_what_it_missed() {
        let web = || service("web", &["10.96.0.10"], &[("", 80, "8080")]);
        let endpoints = || {
            slice(
                "web-a",
                "web",
                "IPv4",
                &[("", 8080)],
                &[
                    ("10.0.1.1", true, false, "n"),
                    ("10.0.1.2", true, false, "n"),
                ],
            )
        };
        let vip = "10.96.0.10:80".parse().unwrap();
        let mut index = index(vec![web()], vec![endpoints()]);
        let Resolution::Endpoint { addr: before, .. } = index.resolve(vip) else {
            panic!("resolves")
        };
        apply(&mut index, vec![web()], vec![endpoints()]);
        let Resolution::Endpoint { addr: after, .. } = index.resolve(vip) else {
            panic!("resolves")
        };
        assert_ne!(before, after);
        assert!(index.has_endpoint(&after));

        // A relist that mentions the Service but not its slice: no endpoint is left.
        index.begin_service_relist();
        index.begin_slice_relist();
        apply(&mut index, vec![web()], vec![]);
        index.end_service_relist();
        index.end_slice_relist();
        assert_eq!(
            index.resolve(vip),
            Resolution::NoReadyEndpoint {
                service: "shop/web"
            }
        );
        assert!(!index.has_endpoint(&after));

        // The Service deleted: its address is no Service's any more.
        index.upsert_service("shop/web", None);
        assert_eq!(index.resolve(vip), Resolution::NotAService);
        assert!(!index.contains("shop/web"));
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
