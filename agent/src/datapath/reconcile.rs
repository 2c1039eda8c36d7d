//! Making the pinned state exactly what this agent's pods imply: the maps and pins a previous
//! agent, another version or anything else left are compared entry by entry with what is
//! expected, and every difference is repaired and logged. Nothing here stops the agent: an
//! entry that cannot be repaired is logged and the rest carries on.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs::File,
    net::IpAddr,
    os::fd::BorrowedFd,
    path::Path,
};

use aya::maps::MapError;
use nodemesh_common::{EnrolledPod, InboundKey, InboundPod, map_names};

use super::{
    DatapathError,
    maps::{DatapathMaps, delete, inbound_key, key_address},
};

/// What the pinned maps and per-pod links must hold, from the pods the agent enrolled and
/// the pods it holds closed while they are pending.
#[derive(Default)]
pub struct Expected<'a> {
    /// Pod cgroups whose connects are captured (or refused, for a pending pod under
    /// `--fail-mode closed`).
    pub cgroups: BTreeSet<u64>,
    /// Pod addresses under inbound capture, and how each treats plaintext.
    pub inbound: BTreeMap<IpAddr, InboundPod>,
    /// The plaintext listener in the pod of each address of an enrolled pod.
    pub listeners: BTreeMap<IpAddr, BorrowedFd<'a>>,
    /// Pods (UIDs) whose inbound link stays pinned, with the network namespace to attach it
    /// to again if its pin is missing (unknown for a pod held without a process).
    pub inbound_links: BTreeMap<String, Option<&'a File>>,
}

impl DatapathMaps {
    /// Repairs every map the agent owns against `expected`; returns how many entries changed.
    pub(super) fn reconcile(&mut self, expected: &Expected<'_>) -> usize {
        self.reconcile_enrolled(&expected.cgroups)
            + self.reconcile_inbound_pods(&expected.inbound)
            + self.reconcile_listeners(&expected.listeners)
    }

    /// Empties `NM_DELIVERIES`: an entry left by an agent that died while delivering would
    /// let plaintext from that source address and port past inbound capture.
    pub(super) fn clear_deliveries(&mut self) -> usize {
        let keys = readable(self.deliveries.keys(), map_names::DELIVERIES);
        let mut cleared = 0;
        for key in &keys {
            if let Ok(true) = delete(&mut self.deliveries, key, map_names::DELIVERIES) {
                cleared += 1;
            }
        }
        if cleared > 0 {
            tracing::info!(
                entries = cleared,
                "cleared the transparent-delivery entries a previous agent left"
            );
        }
        cleared
    }

    fn reconcile_enrolled(&mut self, expected: &BTreeSet<u64>) -> usize {
        const MAP: &str = map_names::ENROLLED_CGROUPS;
        let pinned: HashMap<u64, EnrolledPod> =
            readable(self.enrolled.iter(), MAP).into_iter().collect();
        let mut repairs = 0;
        for cgroup_id in pinned.keys().filter(|id| !expected.contains(id)) {
            if removed(delete(&mut self.enrolled, cgroup_id, MAP)) {
                repairs += 1;
                tracing::info!(
                    cgroup_id,
                    "removed stale enrolment: no meshed pod of this node has this cgroup"
                );
            }
        }
        for cgroup_id in expected {
            let pinned = pinned.get(cgroup_id);
            if pinned == Some(&EnrolledPod::default()) {
                continue;
            }
            // Logs the corrupt entry it replaces.
            if written(self.enrol(*cgroup_id)) {
                repairs += 1;
                if pinned.is_none() {
                    tracing::info!(cgroup_id, "restored a missing enrolment");
                }
            }
        }
        repairs
    }

    fn reconcile_inbound_pods(&mut self, expected: &BTreeMap<IpAddr, InboundPod>) -> usize {
        const MAP: &str = map_names::INBOUND_PODS;
        let pinned: HashMap<InboundKey, InboundPod> = readable(self.inbound_pods.iter(), MAP)
            .into_iter()
            .collect();
        let wanted: HashSet<InboundKey> = expected.keys().map(|addr| inbound_key(*addr)).collect();
        let mut repairs = 0;
        for key in pinned.keys().filter(|key| !wanted.contains(key)) {
            if removed(delete(&mut self.inbound_pods, key, MAP)) {
                repairs += 1;
                tracing::info!(
                    address = %describe(key),
                    "removed stale inbound capture entry: no meshed pod of this node has this address"
                );
            }
        }
        for (addr, pod) in expected {
            let pinned = pinned.get(&inbound_key(*addr));
            if pinned == Some(pod) {
                continue;
            }
            // Logs the mode it replaces.
            if written(self.set_inbound_pod(*addr, *pod)) {
                repairs += 1;
                if pinned.is_none() {
                    tracing::info!(address = %addr, "restored a missing inbound capture entry");
                }
            }
        }
        repairs
    }

    fn reconcile_listeners(&mut self, expected: &BTreeMap<IpAddr, BorrowedFd<'_>>) -> usize {
        const MAP: &str = map_names::INBOUND_LISTENERS;
        let expected: HashMap<InboundKey, (IpAddr, &BorrowedFd<'_>)> = expected
            .iter()
            .map(|(addr, fd)| (inbound_key(*addr), (*addr, fd)))
            .collect();
        let pinned = readable(self.inbound_listeners.keys(), MAP);
        let mut repairs = 0;
        for key in pinned.iter().filter(|key| !expected.contains_key(key)) {
            match delete(&mut self.inbound_listeners, key, MAP) {
                Ok(true) => {
                    repairs += 1;
                    tracing::info!(address = %describe(key), "removed a stale inbound listener entry");
                }
                // Listed a moment ago, gone now: its socket closed and the kernel dropped it.
                Ok(false) => {
                    tracing::info!(address = %describe(key), "stale inbound listener entry already removed by the kernel")
                }
                Err(error) => tracing::error!(%error, "removing a stale inbound listener entry"),
            }
        }
        for (key, (addr, fd)) in &expected {
            if !pinned.contains(key) && written(self.set_listener(*addr, **fd)) {
                repairs += 1;
                tracing::info!(address = %addr, "restored a missing inbound listener entry");
            }
        }
        repairs
    }
}

/// Removes the pinned inbound link of every pod not in `keep` (and staging leftovers of an
/// interrupted attach); returns how many.
pub(super) fn remove_stale_inbound_links(
    dir: &Path,
    keep: &BTreeMap<String, Option<&File>>,
) -> usize {
    super::unpin_others(
        dir,
        |uid| keep.contains_key(uid),
        "removed stale inbound capture link",
    )
}

/// The entries (or keys) of a pinned map that could be read; a failed read is logged and
/// ends the walk, and what was read is reconciled.
fn readable<T>(entries: impl Iterator<Item = Result<T, MapError>>, map: &'static str) -> Vec<T> {
    entries
        .filter_map(|entry| {
            entry
                .inspect_err(|error| {
                    tracing::error!(map, %error, "reading a pinned map; reconciling the entries read")
                })
                .ok()
        })
        .collect()
}

/// Whether a delete removed an entry; a failure is logged (the entry stays for the next try).
fn removed(result: Result<bool, DatapathError>) -> bool {
    result
        .inspect_err(|error| tracing::error!(%error, "removing a stale map entry"))
        .unwrap_or(false)
}

/// Whether a write succeeded; a failure is logged.
fn written(result: Result<(), DatapathError>) -> bool {
    result
        .inspect_err(|error| tracing::error!(%error, "repairing a map entry"))
        .is_ok()
}

/// A pod address as a log shows it; a key no agent writes (another family, non-zero
/// padding) as its raw words.
fn describe(key: &InboundKey) -> String {
    key_address(key).map_or_else(
        || format!("undecodable key {:?} family {}", key.addr, key.family),
        |addr| addr.to_string(),
    )
}
