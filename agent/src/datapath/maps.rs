//! Typed access to the pinned maps the agent writes and reads.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
};
use nodemesh_common::{
    CaptureConfig, ConnectionKey, DeliveryKey, EnrolledPod, FAMILY_V4, FAMILY_V6, FailMode,
    InboundKey, InboundPod, Ipv4Prefix, Ipv6Prefix, OriginalDst, map_names,
};

use super::DatapathError;
use crate::config::Cidr;

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
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    capture_config: Array<MapData, CaptureConfig>,
    excluded_ports: HashMap<MapData, u16, u8>,
    excluded_v4: LpmTrie<MapData, Ipv4Prefix, u8>,
    excluded_v6: LpmTrie<MapData, Ipv6Prefix, u8>,
    connections: HashMap<MapData, ConnectionKey, OriginalDst>,
    inbound_pods: HashMap<MapData, InboundKey, InboundPod>,
    inbound_listeners: SockHash<MapData, InboundKey>,
    deliveries: HashMap<MapData, DeliveryKey, u8>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

/// A removal that found nothing to remove is done too.
fn removed(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(DatapathError::Map { map, source }),
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
        })
    }

    pub(super) fn write_capture_config(
        &mut self,
        outbound_port: u16,
        fail_mode: FailMode,
        proxy_mark: u32,
    ) -> Result<(), DatapathError> {
        let config = CaptureConfig {
            outbound_port,
            _pad: 0,
            fail_mode: fail_mode as u32,
            proxy_mark,
            configured: 1,
        };
        self.capture_config
            .set(0, &config, 0)
            .map_err(map_err(map_names::CAPTURE_CONFIG))
    }

    /// Replaces the exclusion lists with exactly these ports and prefixes.
    pub(super) fn write_exclusions(
        &mut self,
        ports: &[u16],
        cidrs: &[Cidr],
    ) -> Result<(), DatapathError> {
        let stale_ports: Vec<u16> = self.excluded_ports.keys().filter_map(Result::ok).collect();
        for port in stale_ports.iter().filter(|p| !ports.contains(p)) {
            self.excluded_ports
                .remove(port)
                .map_err(map_err(map_names::EXCLUDED_PORTS))?;
        }
        for port in ports {
            self.excluded_ports
                .insert(port, &1, 0)
                .map_err(map_err(map_names::EXCLUDED_PORTS))?;
        }
        let stale_v4: Vec<Key<Ipv4Prefix>> =
            self.excluded_v4.keys().filter_map(Result::ok).collect();
        for key in &stale_v4 {
            self.excluded_v4
                .remove(key)
                .map_err(map_err(map_names::EXCLUDED_CIDRS_V4))?;
        }
        let stale_v6: Vec<Key<Ipv6Prefix>> =
            self.excluded_v6.keys().filter_map(Result::ok).collect();
        for key in &stale_v6 {
            self.excluded_v6
                .remove(key)
                .map_err(map_err(map_names::EXCLUDED_CIDRS_V6))?;
        }
        for cidr in cidrs {
            let prefix_len = u32::from(cidr.prefix_len);
            match cidr.addr {
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

    pub(super) fn enroll(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.enrolled
            .insert(&cgroup_id, &EnrolledPod::default(), 0)
            .map_err(map_err(map_names::ENROLLED_CGROUPS))
    }

    pub(super) fn unenroll(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        removed(
            self.enrolled.remove(&cgroup_id),
            map_names::ENROLLED_CGROUPS,
        )
    }

    pub(super) fn enrolled_cgroups(&self) -> Result<Vec<u64>, DatapathError> {
        self.enrolled
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::ENROLLED_CGROUPS))
    }

    pub(super) fn take_original_destination(&mut self, key: &ConnectionKey) -> Option<OriginalDst> {
        let found = self.connections.get(key, 0).ok()?;
        // Ignore a failed delete: the LRU map evicts the entry eventually anyway.
        let _ = self.connections.remove(key);
        Some(found)
    }

    /// Hands plaintext arriving for `addr` to `listener` (a listening socket in the pod).
    pub(super) fn set_inbound(
        &mut self,
        addr: IpAddr,
        pod: InboundPod,
        listener: BorrowedFd<'_>,
    ) -> Result<(), DatapathError> {
        let key = inbound_key(addr);
        self.inbound_listeners
            .insert(&key, listener.as_raw_fd(), 0)
            .map_err(map_err(map_names::INBOUND_LISTENERS))?;
        self.set_inbound_pod(addr, pod)
    }

    pub(super) fn set_inbound_pod(
        &mut self,
        addr: IpAddr,
        pod: InboundPod,
    ) -> Result<(), DatapathError> {
        self.inbound_pods
            .insert(&inbound_key(addr), &pod, 0)
            .map_err(map_err(map_names::INBOUND_PODS))
    }

    pub(super) fn remove_inbound(&mut self, key: &InboundKey) -> Result<(), DatapathError> {
        removed(self.inbound_pods.remove(key), map_names::INBOUND_PODS)?;
        removed(
            self.inbound_listeners.remove(key),
            map_names::INBOUND_LISTENERS,
        )
    }

    pub(super) fn add_delivery(&mut self, source: SocketAddr) -> Result<(), DatapathError> {
        self.deliveries
            .insert(&delivery_key(source), &1, 0)
            .map_err(map_err(map_names::DELIVERIES))
    }

    pub(super) fn remove_delivery(&mut self, source: SocketAddr) {
        // A failed delete is harmless: the LRU map evicts the entry eventually.
        let _ = self.deliveries.remove(&delivery_key(source));
    }

    pub(super) fn inbound_keys(&self) -> Vec<InboundKey> {
        self.inbound_pods.keys().filter_map(Result::ok).collect()
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
