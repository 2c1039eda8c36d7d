//! Which of a Service port's ready endpoints this node's clients prefer: node hints, zone
//! hints, or the node's zone, read as kube-proxy reads hints (docs/l7.md, Zones).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{Preference, PreferredBy};
use crate::k8s::{
    compact::{EndpointHints, SliceInfo},
    snapshot::Topology,
    zone_policy::{ZoneAffinity, ZonePolicy},
};

/// The ready endpoints for one virtual address and Service port, in address order: from the
/// slices of the address's family, at the target port each slice gives the port's name;
/// with their zones and hints.
pub(super) fn ready_endpoints<'a>(
    slices: &[&'a SliceInfo],
    vip: IpAddr,
    port_name: &str,
) -> Vec<ReadyEndpoint<'a>> {
    let mut endpoints: Vec<ReadyEndpoint<'a>> = slices
        .iter()
        .filter(|slice| slice.ipv4 == vip.is_ipv4())
        .filter_map(|slice| {
            let (_, port) = slice.ports.iter().find(|(name, _)| &**name == port_name)?;
            Some((*slice, *port))
        })
        .flat_map(|(slice, port)| {
            slice.ready.iter().map(move |ip| {
                let zone = (slice.zones.binary_search_by(|(addr, _)| addr.cmp(ip)).ok())
                    .map(|i| Arc::clone(&slice.zones[i].1));
                let hints = (slice.hints.binary_search_by(|(addr, _)| addr.cmp(ip)).ok())
                    .map(|i| &slice.hints[i].1);
                ReadyEndpoint {
                    addr: SocketAddr::new(*ip, port),
                    zone,
                    hints,
                    tier: Tier::Beyond,
                }
            })
        })
        .collect();
    endpoints.sort_by_key(|e| e.addr);
    endpoints.dedup_by_key(|e| e.addr);
    endpoints
}

/// A ready endpoint with its topology, while a port's endpoints are computed.
#[derive(Debug)]
pub(super) struct ReadyEndpoint<'a> {
    pub addr: SocketAddr,
    pub zone: Option<Arc<str>>,
    hints: Option<&'a EndpointHints>,
    tier: Tier,
}

/// How near an endpoint is, the nearest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Preferred,
    /// Not preferred, in a zone of this node's region.
    Region,
    #[default]
    Beyond,
}

/// Which of `ready` a hint (`names` of its hints) gives to `target`, when every endpoint
/// has such a hint and one names `target`.
fn hinted_to<'a>(
    ready: &[ReadyEndpoint<'a>],
    names: fn(&EndpointHints) -> &[Arc<str>],
    target: Option<&str>,
) -> Option<Vec<bool>> {
    let target = target?;
    let names_of = |e: &ReadyEndpoint<'a>| -> &'a [Arc<str>] { e.hints.map_or(&[][..], names) };
    if ready.iter().any(|e| names_of(e).is_empty()) {
        return None;
    }
    let flags: Vec<bool> = (ready.iter())
        .map(|e| names_of(e).iter().any(|name| **name == *target))
        .collect();
    flags.contains(&true).then_some(flags)
}

/// Orders the endpoints by how near they are to this node (`here`), each tier in address
/// order, and says how many are preferred and why, and how many follow in this node's region
/// (zones map to regions by the Nodes' labels). Preferred: node hints under
/// `PreferSameNode`, else zone hints, both only when every endpoint has such hints and one
/// names this node or its zone (as kube-proxy reads them), else the endpoints in this node's
/// zone. None without a preference: the policy is off, or neither this node nor the
/// endpoints have a zone.
pub(super) fn prefer(
    ready: &mut [ReadyEndpoint<'_>],
    policy: &ZonePolicy,
    here: &Topology,
) -> Option<Preference> {
    if policy.affinity == ZoneAffinity::Off || ready.is_empty() {
        return None;
    }
    let node_hints = (policy.prefer_same_node)
        .then(|| hinted_to(ready, |h| &h.nodes, Some(&here.node)))
        .flatten();
    let (by, preferred) = if let Some(flags) = node_hints {
        (PreferredBy::NodeHints, flags)
    } else if let Some(flags) = hinted_to(ready, |h| &h.zones, here.zone.as_deref()) {
        (PreferredBy::ZoneHints, flags)
    } else {
        let zone = here.zone.as_deref()?;
        if !ready.iter().any(|e| e.zone.is_some()) {
            return None;
        }
        let flags = ready.iter().map(|e| e.zone.as_deref() == Some(zone));
        (PreferredBy::Zone, flags.collect())
    };
    let region_of = |zone: &Option<Arc<str>>| zone.as_ref().and_then(|z| here.zone_regions.get(z));
    for (endpoint, preferred) in ready.iter_mut().zip(&preferred) {
        endpoint.tier = if *preferred {
            Tier::Preferred
        } else if here.region.is_some() && region_of(&endpoint.zone) == here.region.as_ref() {
            Tier::Region
        } else {
            Tier::Beyond
        };
    }
    ready.sort_by_key(|e| (e.tier, e.addr));
    let count = |tier| ready.iter().filter(|e| e.tier == tier).count();
    let count = |tier| u32::try_from(count(tier)).unwrap_or(u32::MAX);
    Some(Preference {
        by,
        count: count(Tier::Preferred),
        region: count(Tier::Region),
    })
}
