//! Which addresses of a meshed pod its inbound capture covers: STRICT and AuthorizationPolicy
//! must hold at every address plaintext can reach the pod at, not only at `status.podIPs`.
//! So every other non-loopback address of its network namespace at enrolment counts too:
//! its IPv6 link-local address, and a secondary interface's (Multus).

use std::net::IpAddr;

use nodemesh_common::{INBOUND_STRICT, INBOUND_UDP_DENY, InboundPod};

use crate::{
    k8s::labels::{InboundUdp, PeerAuthentication},
    netns::NetnsError,
    state::membership::MeshedPod,
};

/// The pod's addresses from the API server, then every other one of `local` (its network
/// namespace's) that no other enrolled pod holds: `held_by` names the pod holding an
/// address already (link-local addresses are only unique per link, and the kernel's maps
/// are keyed by address), which keeps it.
pub fn inbound_addresses(
    pod: &MeshedPod,
    local: Result<Vec<IpAddr>, NetnsError>,
    held_by: impl Fn(&IpAddr) -> Option<String>,
) -> Vec<IpAddr> {
    let mut addresses = pod.ips.clone();
    let local = local.unwrap_or_else(|error| {
        tracing::warn!(pod = %pod.display_name(), %error, "cannot list the pod's addresses; capturing those of its status only");
        Vec::new()
    });
    for address in local {
        if addresses.contains(&address) {
            continue;
        }
        match held_by(&address) {
            Some(other) => {
                tracing::warn!(pod = %pod.display_name(), %address, %other, "address held by another pod too; not captured for this one")
            }
            None => addresses.push(address),
        }
    }
    addresses
}

/// The datapath's entry for each captured address of a pod: STRICT drops plaintext TCP when
/// no proxy listens, and `inbound-udp: deny` drops UDP from outside the pod.
pub fn inbound_pod(pod: &MeshedPod) -> InboundPod {
    let strict = match pod.peer_authentication {
        PeerAuthentication::Strict => INBOUND_STRICT,
        PeerAuthentication::Permissive => 0,
    };
    let udp = match pod.inbound_udp {
        InboundUdp::Deny => INBOUND_UDP_DENY,
        InboundUdp::Allow => 0,
    };
    InboundPod {
        flags: strict | udp,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::labels::PeerAuthentication;

    fn pod() -> MeshedPod {
        MeshedPod {
            uid: "uid".into(),
            namespace: "mesh".into(),
            name: "server".into(),
            service_account: "server".into(),
            workload: "server".into(),
            ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            peer_authentication: PeerAuthentication::Strict,
            inbound_udp: InboundUdp::Allow,
            probes: Vec::new(),
            dns: true,
        }
    }

    #[test]
    fn every_local_address_counts_unless_another_pod_holds_it() {
        let local: Vec<IpAddr> = ["10.0.0.5", "fe80::1", "fe80::2", "192.168.7.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let clash: IpAddr = "fe80::2".parse().unwrap();
        let held = |a: &IpAddr| (*a == clash).then(|| "mesh/other".to_owned());
        let addresses: Vec<String> = inbound_addresses(&pod(), Ok(local), held)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["10.0.0.5", "fd00::5", "fe80::1", "192.168.7.5"]);
    }

    #[test]
    fn without_the_list_the_status_addresses_remain() {
        let error = NetnsError::Addresses(std::io::Error::other("netlink"));
        assert_eq!(inbound_addresses(&pod(), Err(error), |_| None), pod().ips);
    }
}
