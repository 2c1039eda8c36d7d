//! Typed access to the pinned maps the agent writes and reads.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, MapData, MapError, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    sys::SyscallError,
};
use ipnet::IpNet;
use nodemesh_common::{
    CaptureConfig, ConnectionKey, DNS_CAPTURE, DeliveryKey, DnsPod, EnrolledPod, FAMILY_V4,
    FAMILY_V6, FailMode, InboundKey, InboundPod, Ipv4Prefix, Ipv6Prefix, OriginalDst, map_names,
};

use super::DatapathError;

/// How full the maps are (entries), for the config dump and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct MapOccupancy {
    pub enrolled_cgroups: usize,
    pub pending_connections: usize,
    pub inbound_addresses: usize,
    pub inbound_listeners: usize,
}

fn delivery_key(source: SocketAddr) -> DeliveryKey {
    let (addr, family) = address_words(source.ip());
    DeliveryKey {
        addr,
        port: source.port(),
        family,
    }
}

/// The key of a pod address in the inbound maps.
pub fn inbound_key(ip: IpAddr) -> InboundKey {
    let (addr, family) = address_words(ip);
    InboundKey {
        addr,
        family,
        _pad: 0,
    }
}

/// The pod address a key of the inbound maps names; `None` for a key the agent never
/// writes (another family, bits outside the address), which reconciliation removes.
pub fn key_address(key: &InboundKey) -> Option<IpAddr> {
    let decoded = match key.family {
        FAMILY_V4 => IpAddr::from(key.addr[0].to_ne_bytes()),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.as_chunks_mut::<4>().0.iter_mut().zip(key.addr) {
                *chunk = word.to_ne_bytes();
            }
            IpAddr::from(octets)
        }
        _ => return None,
    };
    (inbound_key(decoded) == *key).then_some(decoded)
}

/// Where a captured socket was going, as a socket address (the inverse of
/// [`address_words`] with the port).
pub fn socket_addr(original: OriginalDst) -> SocketAddr {
    let ip = if original.family == FAMILY_V4 {
        IpAddr::from(original.addr[0].to_ne_bytes())
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.as_chunks_mut::<4>().0.iter_mut().zip(original.addr) {
            *chunk = word.to_ne_bytes();
        }
        IpAddr::from(octets)
    };
    SocketAddr::new(ip, original.port)
}

/// An address as the kernel hands it to programs (see agent-common's crate docs): IPv4 in
/// the first word, network byte order; IPv6 as four network-order words; and its family tag.
pub fn address_words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

pub(super) struct DatapathMaps {
    pub(super) enrolled: HashMap<MapData, u64, EnrolledPod>,
    capture_config: Array<MapData, CaptureConfig>,
    excluded_ports: HashMap<MapData, u16, u8>,
    excluded_v4: LpmTrie<MapData, Ipv4Prefix, u8>,
    excluded_v6: LpmTrie<MapData, Ipv6Prefix, u8>,
    connections: HashMap<MapData, ConnectionKey, OriginalDst>,
    pub(super) inbound_pods: HashMap<MapData, InboundKey, InboundPod>,
    pub(super) inbound_listeners: SockHash<MapData, InboundKey>,
    pub(super) deliveries: HashMap<MapData, DeliveryKey, u8>,
    dns_pods: HashMap<MapData, u64, DnsPod>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

/// A map the agent deletes keys from (aya's map types share no trait for it).
pub(super) trait Delete<K> {
    fn delete_key(&mut self, key: &K) -> Result<(), MapError>;
}

impl<K: Pod, V: Pod> Delete<K> for HashMap<MapData, K, V> {
    fn delete_key(&mut self, key: &K) -> Result<(), MapError> {
        self.remove(key)
    }
}

impl<K: Pod> Delete<K> for SockHash<MapData, K> {
    fn delete_key(&mut self, key: &K) -> Result<(), MapError> {
        self.remove(key)
    }
}

impl<K: Pod, V: Pod> Delete<Key<K>> for LpmTrie<MapData, K, V> {
    fn delete_key(&mut self, key: &Key<K>) -> Result<(), MapError> {
        self.remove(key)
    }
}

/// Deletes `key` from `map`; every delete of the agent goes through here. A key that is not
/// there counts as deleted (`Ok(false)`): the kernel drops a sockhash entry when its socket
/// closes, LRU maps evict, and another agent may have been first, so a missing key is never
/// an error that could stop the agent.
pub(super) fn delete<K>(
    map: &mut impl Delete<K>,
    key: &K,
    name: &'static str,
) -> Result<bool, DatapathError> {
    match map.delete_key(key) {
        Ok(()) => Ok(true),
        Err(error) if is_missing_key(&error) => Ok(false),
        Err(source) => Err(DatapathError::Map { map: name, source }),
    }
}

/// `bpf_map_delete_elem` answers ENOENT for a key that is not in the map.
fn is_missing_key(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl DatapathMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            enrolled: take(ebpf, map_names::ENROLLED_CGROUPS)?,
            capture_config: take(ebpf, map_names::CAPTURE_CONFIG)?,
            excluded_ports: take(ebpf, map_names::EXCLUDED_PORTS)?,
            excluded_v4: take(ebpf, map_names::EXCLUDED_CIDRS_V4)?,
            excluded_v6: take(ebpf, map_names::EXCLUDED_CIDRS_V6)?,
            connections: take(ebpf, map_names::CONNECTION_ORIGINAL_DST)?,
            inbound_pods: take(ebpf, map_names::INBOUND_PODS)?,
            inbound_listeners: take(ebpf, map_names::INBOUND_LISTENERS)?,
            deliveries: take(ebpf, map_names::DELIVERIES)?,
            dns_pods: take(ebpf, map_names::DNS_PODS)?,
        })
    }

    pub(super) fn write_capture_config(
        &mut self,
        outbound_port: u16,
        dns_port: u16,
        fail_mode: FailMode,
        proxy_mark: u32,
    ) -> Result<(), DatapathError> {
        let config = CaptureConfig {
            outbound_port,
            dns_port,
            fail_mode: fail_mode as u32,
            proxy_mark,
            configured: 1,
        };
        self.capture_config
            .set(0, &config, 0)
            .map_err(map_err(map_names::CAPTURE_CONFIG))
    }

    /// Makes `NM_DNS_PODS` hold exactly the network namespaces in `captured`, keeping the
    /// resolver the programs recorded for those already there; returns how many entries
    /// changed.
    pub(super) fn set_dns_pods(&mut self, captured: &[u64]) -> Result<usize, DatapathError> {
        const MAP: &str = map_names::DNS_PODS;
        let pinned: Vec<(u64, DnsPod)> = self.dns_pods.iter().filter_map(Result::ok).collect();
        let mut changed = 0;
        for (cookie, _) in pinned.iter().filter(|(c, _)| !captured.contains(c)) {
            changed += usize::from(delete(&mut self.dns_pods, cookie, MAP)?);
        }
        for cookie in captured {
            let old = pinned.iter().find(|(c, _)| c == cookie).map(|(_, p)| *p);
            if old.is_some_and(|p| p.flags == DNS_CAPTURE) {
                continue;
            }
            let entry = DnsPod {
                flags: DNS_CAPTURE,
                _pad: 0,
                resolver: old.map(|p| p.resolver).unwrap_or_default(),
            };
            self.dns_pods
                .insert(cookie, &entry, 0)
                .map_err(map_err(MAP))?;
            changed += 1;
        }
        Ok(changed)
    }

    /// The resolver the pod in network namespace `cookie` last addressed.
    pub(super) fn dns_resolver(&self, cookie: u64) -> Option<SocketAddr> {
        let pod = self.dns_pods.get(&cookie, 0).ok()?;
        (pod.resolver.port != 0).then(|| socket_addr(pod.resolver))
    }

    /// Replaces the exclusion lists with exactly these ports and prefixes.
    pub(super) fn write_exclusions(
        &mut self,
        ports: &[u16],
        cidrs: &[IpNet],
    ) -> Result<(), DatapathError> {
        let stale_ports: Vec<u16> = self.excluded_ports.keys().filter_map(Result::ok).collect();
        for port in stale_ports.iter().filter(|p| !ports.contains(p)) {
            if delete(&mut self.excluded_ports, port, map_names::EXCLUDED_PORTS)? {
                tracing::info!(port, "removed an excluded port no --exclude-port asks for");
            }
        }
        for port in ports {
            self.excluded_ports
                .insert(port, &1, 0)
                .map_err(map_err(map_names::EXCLUDED_PORTS))?;
        }
        let stale_v4: Vec<Key<Ipv4Prefix>> =
            self.excluded_v4.keys().filter_map(Result::ok).collect();
        for key in &stale_v4 {
            delete(&mut self.excluded_v4, key, map_names::EXCLUDED_CIDRS_V4)?;
        }
        let stale_v6: Vec<Key<Ipv6Prefix>> =
            self.excluded_v6.keys().filter_map(Result::ok).collect();
        for key in &stale_v6 {
            delete(&mut self.excluded_v6, key, map_names::EXCLUDED_CIDRS_V6)?;
        }
        for cidr in cidrs {
            let prefix_len = u32::from(cidr.prefix_len());
            match cidr.addr() {
                IpAddr::V4(v4) => {
                    let key = Key::new(prefix_len, u32::from_ne_bytes(v4.octets()));
                    self.excluded_v4
                        .insert(&key, &1, 0)
                        .map_err(map_err(map_names::EXCLUDED_CIDRS_V4))?;
                }
                IpAddr::V6(v6) => {
                    let key = Key::new(prefix_len, v6.octets());
                    self.excluded_v6
                        .insert(&key, &1, 0)
                        .map_err(map_err(map_names::EXCLUDED_CIDRS_V6))?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn enrol(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        let wanted = EnrolledPod::default();
        if let Ok(pinned) = self.enrolled.get(&cgroup_id, 0)
            && pinned != wanted
        {
            tracing::info!(
                cgroup_id,
                flags = pinned.flags,
                pad = pinned._pad,
                "rewrote a corrupt enrolment entry"
            );
        }
        self.enrolled
            .insert(&cgroup_id, &wanted, 0)
            .map_err(map_err(map_names::ENROLLED_CGROUPS))
    }

    pub(super) fn unenrol(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        delete(&mut self.enrolled, &cgroup_id, map_names::ENROLLED_CGROUPS).map(drop)
    }

    pub(super) fn take_original_destination(&mut self, key: &ConnectionKey) -> Option<OriginalDst> {
        let found = self.connections.get(key, 0).ok()?;
        // Ignore a failed delete: the LRU map evicts the entry eventually anyway.
        let _ = delete(
            &mut self.connections,
            key,
            map_names::CONNECTION_ORIGINAL_DST,
        );
        Some(found)
    }

    /// Hands plaintext arriving for `addr` to `listener` (a listening socket in the pod).
    pub(super) fn set_inbound(
        &mut self,
        addr: IpAddr,
        pod: InboundPod,
        listener: BorrowedFd<'_>,
    ) -> Result<(), DatapathError> {
        self.set_listener(addr, listener)?;
        self.set_inbound_pod(addr, pod)
    }

    /// Hands plaintext arriving for `addr` to `listener`, whatever mode the pod has.
    pub(super) fn set_listener(
        &mut self,
        addr: IpAddr,
        listener: BorrowedFd<'_>,
    ) -> Result<(), DatapathError> {
        self.inbound_listeners
            .insert(&inbound_key(addr), listener.as_raw_fd(), 0)
            .map_err(map_err(map_names::INBOUND_LISTENERS))
    }

    pub(super) fn set_inbound_pod(
        &mut self,
        addr: IpAddr,
        pod: InboundPod,
    ) -> Result<(), DatapathError> {
        let key = inbound_key(addr);
        if let Ok(pinned) = self.inbound_pods.get(&key, 0)
            && pinned != pod
        {
            tracing::info!(
                address = %addr,
                pinned_flags = pinned.flags,
                flags = pod.flags,
                "rewrote the inbound mode of an address"
            );
        }
        self.inbound_pods
            .insert(&key, &pod, 0)
            .map_err(map_err(map_names::INBOUND_PODS))
    }

    pub(super) fn remove_inbound(&mut self, key: &InboundKey) -> Result<(), DatapathError> {
        delete(&mut self.inbound_pods, key, map_names::INBOUND_PODS)?;
        delete(
            &mut self.inbound_listeners,
            key,
            map_names::INBOUND_LISTENERS,
        )
        .map(drop)
    }

    pub(super) fn add_delivery(&mut self, source: SocketAddr) -> Result<(), DatapathError> {
        self.deliveries
            .insert(&delivery_key(source), &1, 0)
            .map_err(map_err(map_names::DELIVERIES))
    }

    pub(super) fn remove_delivery(&mut self, source: SocketAddr) {
        // A failed delete is harmless: the LRU map evicts the entry eventually.
        let _ = delete(
            &mut self.deliveries,
            &delivery_key(source),
            map_names::DELIVERIES,
        );
    }

    pub(super) fn occupancy(&self) -> MapOccupancy {
        MapOccupancy {
            enrolled_cgroups: self.enrolled.keys().count(),
            pending_connections: self.connections.keys().count(),
            inbound_addresses: self.inbound_pods.keys().count(),
            inbound_listeners: self.inbound_listeners.keys().count(),
        }
    }
}
