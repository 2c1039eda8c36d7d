//! A node's pinned datapath read straight from bpffs, independently of the agent's code: the
//! maps' entries and the pins of maps and links. Tests compare it with what the cluster
//! implies, and write foreign or corrupt entries into it to see them repaired.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, SockHash};
use nodemesh_common::{
    DeliveryKey, EnrolledPod, FAMILY_V4, FAMILY_V6, InboundKey, InboundPod, map_names,
};

use crate::error::{Result, TestbedError};

/// What a node's bpffs directory holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedState {
    /// `NM_ENROLLED_CGROUPS`: pod cgroup id → the entry's flags.
    pub enrolled: BTreeMap<u64, u32>,
    /// `NM_INBOUND_PODS`: pod address (or the raw key, for one no agent writes) → flags.
    pub inbound_pods: BTreeMap<String, u32>,
    /// `NM_INBOUND_LISTENERS`: the addresses that have a plaintext listener.
    pub inbound_listeners: BTreeSet<String>,
    /// `NM_EXCLUDED_PORTS`.
    pub excluded_ports: BTreeSet<u16>,
    /// Entries in `NM_DELIVERIES`.
    pub deliveries: usize,
    /// Names pinned under `maps/`.
    pub maps: BTreeSet<String>,
    /// Names pinned under `links/` (the cgroup links).
    pub links: BTreeSet<String>,
    /// Names pinned under `links/inbound/` (pod UIDs).
    pub inbound_links: BTreeSet<String>,
}

/// The key an agent writes for a pod address (agent-common's encoding: IPv4 in the first
/// word, IPv6 as four words, network byte order).
pub fn inbound_key(ip: IpAddr) -> InboundKey {
    let (addr, family) = match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let mut addr = [0u32; 4];
            for (word, chunk) in addr.iter_mut().zip(v6.octets().as_chunks::<4>().0) {
                *word = u32::from_ne_bytes(*chunk);
            }
            (addr, FAMILY_V6)
        }
    };
    InboundKey {
        addr,
        family,
        _pad: 0,
    }
}

/// How a key of the inbound maps reads in a [`PinnedState`].
fn key_name(key: &InboundKey) -> String {
    let decoded = match key.family {
        FAMILY_V4 => Some(IpAddr::from(key.addr[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.as_chunks_mut::<4>().0.iter_mut().zip(key.addr) {
                *chunk = word.to_ne_bytes();
            }
            Some(IpAddr::from(octets))
        }
        _ => None,
    };
    match decoded.filter(|ip| inbound_key(*ip) == *key) {
        Some(ip) => ip.to_string(),
        None => format!("raw {:?} family {} pad {}", key.addr, key.family, key._pad),
    }
}

fn names_in(dir: &Path, files_only: bool) -> Result<BTreeSet<String>> {
    let entries = std::fs::read_dir(dir).map_err(|source| TestbedError::Io {
        what: format!("listing {}", dir.display()),
        source,
    })?;
    Ok(entries
        .filter_map(std::result::Result::ok)
        .filter(|e| !files_only || e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

fn map_error(path: &Path, error: impl std::fmt::Display) -> TestbedError {
    TestbedError::Other(format!("pinned map {}: {error}", path.display()))
}

/// The pinned maps of one node's agent, opened from bpffs.
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// The maps under `<bpffs>/maps`.
    pub fn at(bpffs: &Path) -> Self {
        Self {
            dir: bpffs.join("maps"),
        }
    }

    fn open<T>(&self, name: &str) -> Result<T>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).map_err(|e| map_error(&path, e))?;
        let map = Map::from_map_data(data).map_err(|e| map_error(&path, e))?;
        T::try_from(map).map_err(|e| map_error(&path, e))
    }

    /// Everything pinned under `bpffs`, entry by entry.
    pub fn read(bpffs: &Path) -> Result<PinnedState> {
        let maps = Self::at(bpffs);
        let enrolled: HashMap<MapData, u64, EnrolledPod> =
            maps.open(map_names::ENROLLED_CGROUPS)?;
        let inbound_pods: HashMap<MapData, InboundKey, InboundPod> =
            maps.open(map_names::INBOUND_PODS)?;
        let listeners: SockHash<MapData, InboundKey> = maps.open(map_names::INBOUND_LISTENERS)?;
        let excluded: HashMap<MapData, u16, u8> = maps.open(map_names::EXCLUDED_PORTS)?;
        let deliveries: HashMap<MapData, DeliveryKey, u8> = maps.open(map_names::DELIVERIES)?;
        let read_error = |name: &str, e: aya::maps::MapError| {
            TestbedError::Other(format!("reading {name}: {e}"))
        };
        Ok(PinnedState {
            enrolled: enrolled
                .iter()
                .map(|entry| entry.map(|(id, pod)| (id, pod.flags)))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| read_error(map_names::ENROLLED_CGROUPS, e))?,
            inbound_pods: inbound_pods
                .iter()
                .map(|entry| entry.map(|(key, pod)| (key_name(&key), pod.flags)))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| read_error(map_names::INBOUND_PODS, e))?,
            inbound_listeners: listeners
                .keys()
                .map(|key| key.map(|key| key_name(&key)))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| read_error(map_names::INBOUND_LISTENERS, e))?,
            excluded_ports: excluded
                .keys()
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| read_error(map_names::EXCLUDED_PORTS, e))?,
            deliveries: deliveries.keys().count(),
            maps: names_in(&bpffs.join("maps"), false)?,
            links: names_in(&bpffs.join("links"), true)?,
            inbound_links: names_in(&bpffs.join("links/inbound"), false)?,
        })
    }

    /// Writes `NM_ENROLLED_CGROUPS[cgroup_id] = {flags}`.
    pub fn enrol(&self, cgroup_id: u64, flags: u32) -> Result<()> {
        let mut map: HashMap<MapData, u64, EnrolledPod> = self.open(map_names::ENROLLED_CGROUPS)?;
        map.insert(&cgroup_id, &EnrolledPod { flags, _pad: 0 }, 0)
            .map_err(|e| map_error(&self.dir, e))
    }

    /// Writes `NM_INBOUND_PODS[key] = {flags}`.
    pub fn set_inbound(&self, key: InboundKey, flags: u32) -> Result<()> {
        let mut map: HashMap<MapData, InboundKey, InboundPod> =
            self.open(map_names::INBOUND_PODS)?;
        map.insert(&key, &InboundPod { flags, _pad: 0 }, 0)
            .map_err(|e| map_error(&self.dir, e))
    }

    /// Writes `NM_EXCLUDED_PORTS[port]`: connects to that port are not captured.
    pub fn exclude_port(&self, port: u16) -> Result<()> {
        let mut map: HashMap<MapData, u16, u8> = self.open(map_names::EXCLUDED_PORTS)?;
        map.insert(&port, &1, 0)
            .map_err(|e| map_error(&self.dir, e))
    }

    /// Deletes `NM_INBOUND_LISTENERS[address]`.
    pub fn remove_listener(&self, ip: IpAddr) -> Result<()> {
        let mut map: SockHash<MapData, InboundKey> = self.open(map_names::INBOUND_LISTENERS)?;
        map.remove(&inbound_key(ip))
            .map_err(|e| map_error(&self.dir, e))
    }
}
