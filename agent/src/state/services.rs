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
//! Each port's endpoints are kept with the ones this node's clients prefer first: those the
//! EndpointSlice controller hinted to this node (`trafficDistribution: PreferSameNode`) or to
//! this zone, else those in this node's zone (docs/l7.md, Zones). A connection goes to a
//! preferred endpoint while there is one; requests follow the Service's zone policy in the
//! L7 balancer.

//!
//! The index is kept current event by event by the cluster source: a Service or EndpointSlice
//! event recomputes that one Service's virtual ports (keeping each port's round-robin
//! position), never the whole cluster's. A relist updates in place and then drops what it did
//! not mention.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    ops::Range,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use self::preference::{prefer, ready_endpoints};
use crate::k8s::{
    compact::{ServiceInfo, SliceInfo},
    snapshot::{ServiceStore, Topology},
    zone_policy::{InvalidZonePolicy, ZoneAffinity, ZonePolicy},
};
use crate::peer::ZonePair;

mod preference;

/// The index as the proxies and the cluster source share it.
pub type SharedServices = Arc<RwLock<ServiceIndex>>;

/// One port of one virtual address.
#[derive(Debug)]
struct ServicePort {
    /// `namespace/name`.
    service: Arc<str>,
    /// The Service port's `appProtocol`, which overrides protocol detection.
    app_protocol: Option<Arc<str>>,
    /// The ready endpoints, the preferred ones first.
    endpoints: Box<[SocketAddr]>,
    /// `zones[i]` is `endpoints[i]`'s zone; empty when no endpoint has one.
    zones: Box<[Option<Arc<str>>]>,
    /// Which endpoints this node's clients prefer; None: no preference.
    preference: Option<Preference>,
    policy: ZonePolicy,
    /// Whether requests spill out of the preferred endpoints now (the L7 balancer's state).
    spilling: AtomicBool,
    next: AtomicUsize,
}

/// What makes endpoints preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferredBy {
    /// `hints.forNodes` names this node.
    NodeHints,
    /// `hints.forZones` names this node's zone.
    ZoneHints,
    /// The endpoint's zone is this node's.
    Zone,
}

/// The first `count` endpoints of a port are preferred, for the reason `by`; the next
/// `region` are in this node's region (where spilled traffic goes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Preference {
    pub by: PreferredBy,
    pub count: u32,
    pub region: u32,
}

impl Preference {
    /// The index ranges of a port's `len` endpoints, nearest first: preferred, this
    /// region's, the rest.
    pub fn tiers(self, len: usize) -> [Range<usize>; 3] {
        let preferred = (self.count as usize).min(len);
        let region = (preferred + self.region as usize).min(len);
        [0..preferred, preferred..region, region..len]
    }
}

/// One Service port's endpoints as the L7 balancer chooses among them.
#[derive(Clone, Copy, Debug)]
pub struct Candidates<'a> {
    /// `namespace/name`.
    pub service: &'a str,
    pub port: u16,
    /// The ready endpoints, the preferred ones first.
    pub endpoints: &'a [SocketAddr],
    /// `zones[i]` is `endpoints[i]`'s zone; empty when no endpoint has one.
    pub zones: &'a [Option<Arc<str>>],
    pub preference: Option<Preference>,
    pub policy: ZonePolicy,
    /// The port's spill state, which the balancer keeps.
    pub spilling: &'a AtomicBool,
}

impl Candidates<'_> {
    /// The zone of `endpoints[index]`, when it has one.
    pub fn zone(&self, index: usize) -> Option<&Arc<str>> {
        self.zones.get(index).and_then(Option::as_ref)
    }
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
    /// The preferred ones first.
    pub ready_endpoints: Vec<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone_preference: Option<Preference>,
    pub zone_policy: ZonePolicy,
    /// Requests spill out of the preferred endpoints now.
    pub spilling: bool,
}

/// What a destination address is, as far as Services go.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution<'a> {
    /// Not a Service's virtual address: dial it as it is.
    NotAService,
    /// A Service port without a ready endpoint: refuse, as kube-proxy does.
    NoReadyEndpoint { service: &'a str },
    Endpoint {
        service: &'a str,
        addr: SocketAddr,
        /// The endpoint's zone, when it has one.
        zone: Option<&'a Arc<str>>,
    },
}

/// A Service and its EndpointSlices, as last seen, with the relist that last mentioned each.
#[derive(Debug, Default)]
struct ServiceEntry {
    service: Option<(ServiceInfo, u64)>,
    slices: HashMap<Arc<str>, (SliceInfo, u64)>,
    /// The virtual address:ports published for it.
    published: Vec<SocketAddr>,
    /// Its last good zone policy.
    zone_policy: ZonePolicy,
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
    /// Where this node is (its name, zone and region) and each zone's region.
    topology: Topology,
    /// Services whose zone annotations are rejected (their last good policy applies).
    policy_errors: BTreeMap<Arc<str>, InvalidZonePolicy>,
}

impl ServiceIndex {
    /// This node's zone, when its Node has one: the zone clients here prefer.
    pub fn local_zone(&self) -> Option<&Arc<str>> {
        self.topology.zone.as_ref()
    }

    /// This node's zone and `destination`'s (an endpoint's zone), for metrics; None when
    /// this node has no zone.
    pub fn zones_to(&self, destination: Option<&Arc<str>>) -> Option<ZonePair> {
        self.local_zone().map(|here| ZonePair {
            source: Arc::clone(here),
            destination: destination.cloned(),
        })
    }

    /// Where this node is, and each known zone's region.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn shared() -> SharedServices {
        Arc::default()
    }

    /// Resolves `destination`, choosing the next ready endpoint when it is a Service port:
    /// the next `usable` preferred one while there is one, else the next usable one in this
    /// node's region, else beyond; when none is usable, the next preferred one regardless.
    pub fn resolve(
        &self,
        destination: SocketAddr,
        usable: impl Fn(&SocketAddr) -> bool,
    ) -> Resolution<'_> {
        let Some(port) = self.by_vip.get(&destination) else {
            return Resolution::NotAService;
        };
        let len = port.endpoints.len();
        if len == 0 {
            return Resolution::NoReadyEndpoint {
                service: &port.service,
            };
        }
        let tiers = port
            .preference
            .map_or([0..len, len..len, len..len], |p| p.tiers(len));
        let turn = port.next.fetch_add(1, Ordering::Relaxed);
        let in_tier = |tier: &Range<usize>, k: usize| tier.start + (turn + k) % tier.len();
        let nonempty = tiers.iter().filter(|tier| !tier.is_empty());
        let index = nonempty
            .clone()
            .find_map(|tier| {
                (0..tier.len())
                    .map(|k| in_tier(tier, k))
                    .find(|i| usable(&port.endpoints[*i]))
            })
            .or_else(|| nonempty.clone().next().map(|tier| in_tier(tier, 0)))
            .unwrap_or(0);
        Resolution::Endpoint {
            service: &port.service,
            addr: port.endpoints[index],
            zone: port.zones.get(index).and_then(Option::as_ref),
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
    /// with what the balancer needs to prefer some; None when there is no such port.
    pub fn candidates(&self, service: &str, port: u16, ipv4: bool) -> Option<Candidates<'_>> {
        let (info, _) = self.services.get(service)?.service.as_ref()?;
        let ip = info.virtual_ips.iter().find(|ip| ip.is_ipv4() == ipv4)?;
        let published = self.by_vip.get(&SocketAddr::new(*ip, port))?;
        Some(Candidates {
            service: &published.service,
            port,
            endpoints: &published.endpoints,
            zones: &published.zones,
            preference: published.preference,
            policy: published.policy,
            spilling: &published.spilling,
        })
    }

    /// One message per Service whose zone annotations are rejected.
    pub fn errors(&self) -> Vec<String> {
        (self.policy_errors.iter())
            .map(|(service, error)| {
                format!("Service {service}: {error}; keeping its last good zone policy")
            })
            .collect()
    }

    /// The Service ports whose requests spill out of their preferred endpoints now.
    pub fn spilling(&self) -> Vec<String> {
        let mut keys: Vec<String> = (self.by_vip.iter())
            .filter(|(_, port)| port.spilling.load(Ordering::Relaxed))
            .map(|(vip, port)| format!("{}:{}", port.service, vip.port()))
            .collect();
        keys.sort();
        keys.dedup();
        keys
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
                zone_preference: port.preference,
                zone_policy: port.policy,
                spilling: port.spilling.load(Ordering::Relaxed),
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
                match &service.zone_policy {
                    Ok(policy) => {
                        entry.zone_policy = *policy;
                        self.policy_errors.remove(&service.key);
                    }
                    Err(error) => {
                        tracing::warn!(service = %service.key, %error, "zone policy rejected; keeping its last good version");
                        self.policy_errors
                            .insert(Arc::clone(&service.key), error.clone());
                    }
                }
                entry.service = Some((service, self.service_epoch));
            }
            None => match self.services.get_mut(key) {
                Some(entry) => {
                    entry.service = None;
                    entry.zone_policy = ZonePolicy::default();
                    self.policy_errors.remove(key);
                }
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
                positions.insert(vip, (port.next.into_inner(), port.spilling.into_inner()));
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
        let policy = entry.zone_policy;
        let here = &self.topology;
        for vip in &service.virtual_ips {
            for port in &service.ports {
                let addr = SocketAddr::new(*vip, port.port);
                let mut ready = ready_endpoints(&slices, *vip, &port.name);
                let preference = prefer(&mut ready, &policy, here);
                for endpoint in &ready {
                    *self.endpoint_refs.entry(endpoint.addr).or_default() += 1;
                }
                let zoned = ready.iter().any(|e| e.zone.is_some());
                let zones = match zoned {
                    true => ready.iter().map(|e| e.zone.clone()).collect(),
                    false => Box::default(),
                };
                // The rotation goes on where it was (a change does not send the next
                // connections to the first endpoint again), and so does a spill.
                let (next, spilling) = positions.get(&addr).copied().unwrap_or_default();
                entry.published.push(addr);
                self.by_vip.insert(
                    addr,
                    ServicePort {
                        service: Arc::clone(&service.key),
                        app_protocol: port.app_protocol.clone(),
                        endpoints: ready.iter().map(|e| e.addr).collect(),
                        zones,
                        preference,
                        policy,
                        // Only a `load` port with endpoints on both sides of its
                        // preference can be spilling.
                        spilling: AtomicBool::new(
                            spilling
                                && policy.affinity == ZoneAffinity::Load
                                && preference.is_some_and(|p| {
                                    p.count > 0 && (p.count as usize) < ready.len()
                                }),
                        ),
                        next: AtomicUsize::new(next),
                    },
                );
            }
        }
    }

    /// Publishes every Service's virtual ports again (this node's zone or name changed).
    fn recompute_all(&mut self) {
        let keys: Vec<Arc<str>> = self.services.keys().cloned().collect();
        for key in keys {
            self.recompute(&key);
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
    fn set_topology(&mut self, topology: Topology) {
        if self.topology != topology {
            tracing::info!(
                node = %topology.node,
                zone = topology.zone.as_deref().unwrap_or("none"),
                region = topology.region.as_deref().unwrap_or("none"),
                zones_known = topology.zone_regions.len(),
                "this node's place in the topology"
            );
            self.topology = topology;
            self.recompute_all();
        }
    }
}

#[cfg(test)]
mod tests;
