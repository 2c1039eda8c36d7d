//! Layouts of every eBPF map key and value that both the kernel programs and the agent touch.
//!
//! One `#[repr(C)]` definition per type, so the two sides never disagree. Addresses are stored
//! as the kernel hands them to BPF programs: IPv4 in `addr[0]` in network byte order (the other
//! words zero), IPv6 as four network-order words. Ports are in host byte order.
#![no_std]

/// Names of the pinned maps, shared so the agent opens exactly what the programs declare.
///
/// A map's name is its layout version: agents that pin a map under the same name share it,
/// so a map whose key, value, type, capacity, flags or meaning changes must get a new name
/// (`NM_ENROLLED_CGROUPS_V2`, ...) in the same change. A successor then creates the new map
/// next to the old one and unpins the old one once it is in charge (docs/lifecycle.md,
/// "Upgrade compatibility"); the agent's `layout_fingerprint` test fails until the name is
/// changed.
pub mod map_names {
    pub const ENROLLED_CGROUPS: &str = "NM_ENROLLED_CGROUPS";
    pub const CAPTURE_CONFIG: &str = "NM_CAPTURE_CONFIG";
    pub const EXCLUDED_PORTS: &str = "NM_EXCLUDED_PORTS";
    pub const EXCLUDED_CIDRS_V4: &str = "NM_EXCLUDED_V4";
    pub const EXCLUDED_CIDRS_V6: &str = "NM_EXCLUDED_V6";
    pub const SOCKET_ORIGINAL_DST: &str = "NM_SOCKET_ORIG_DST";
    pub const CONNECTION_ORIGINAL_DST: &str = "NM_CONN_ORIG_DST";
    pub const INBOUND_PODS: &str = "NM_INBOUND_PODS";
    pub const INBOUND_LISTENERS: &str = "NM_INBOUND_LISTENERS";
    pub const DELIVERIES: &str = "NM_DELIVERIES";
    pub const DNS_PODS: &str = "NM_DNS_PODS";

    /// Every map this version pins; anything else under the pin directory belongs to
    /// another version (or to nobody) and is unpinned once the agent is in charge.
    pub const ALL: [&str; 11] = [
        ENROLLED_CGROUPS,
        CAPTURE_CONFIG,
        EXCLUDED_PORTS,
        EXCLUDED_CIDRS_V4,
        EXCLUDED_CIDRS_V6,
        SOCKET_ORIGINAL_DST,
        CONNECTION_ORIGINAL_DST,
        INBOUND_PODS,
        INBOUND_LISTENERS,
        DELIVERIES,
        DNS_PODS,
    ];
}

/// Names of the programs in the object file.
pub mod program_names {
    pub const CONNECT4: &str = "nm_connect4";
    pub const CONNECT6: &str = "nm_connect6";
    pub const GETPEERNAME4: &str = "nm_getpeername4";
    pub const GETPEERNAME6: &str = "nm_getpeername6";
    pub const SOCK_OPS: &str = "nm_sock_ops";
    pub const INBOUND_LOOKUP: &str = "nm_inbound_lookup";
    pub const SENDMSG4: &str = "nm_sendmsg4";
    pub const SENDMSG6: &str = "nm_sendmsg6";
    pub const RECVMSG4: &str = "nm_recvmsg4";
    pub const RECVMSG6: &str = "nm_recvmsg6";

    /// The programs attached to the pod cgroup root, one pinned link each.
    pub const CGROUP: [&str; 5] = [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6, SOCK_OPS];
    /// The cgroup programs attached besides when DNS capture is on.
    pub const CGROUP_DNS: [&str; 4] = [RECVMSG4, RECVMSG6, SENDMSG4, SENDMSG6];
}

/// Address family tags as stored in the maps (the kernel's AF_INET/AF_INET6 values).
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// Port of the HBONE (mTLS) listener in every meshed pod; never captured inbound.
pub const HBONE_PORT: u16 = 15008;
/// Capacity of the inbound maps (pod addresses per node).
pub const MAX_INBOUND_ADDRESSES: u32 = 8192;

/// Capacity of the socket-keyed maps; LRU, so a burst never makes capture fail.
pub const MAX_TRACKED_SOCKETS: u32 = 65536;
/// Capacity of the enrolment map (pods per node).
pub const MAX_ENROLLED_PODS: u32 = 4096;
/// Deepest cgroup level the connect hook checks for an enrolled ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// What the kernel does with a meshed pod's connect() when the proxy has no listener
/// in the pod (the agent is stopped or dead).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Let the connection go to its destination untouched.
    Open = 0,
    /// Refuse connect() at once with EPERM.
    Closed = 1,
}

/// Value of `NM_ENROLLED_CGROUPS`, keyed by the pod-level cgroup id (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Reserved for per-pod capture flags; zero today.
    pub flags: u32,
    pub _pad: u32,
}

/// Single entry (index 0) of the `NM_CAPTURE_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Port of the proxy's outbound listener on the pod's loopback.
    pub outbound_port: u16,
    /// Port of the proxy's DNS listener on the pod's loopback; 0 leaves DNS alone. (This
    /// was padding, always written 0, before DNS capture: agents that predate it share the
    /// map and turn DNS capture off when they write it.)
    pub dns_port: u16,
    /// A `FailMode` discriminant.
    pub fail_mode: u32,
    /// SO_MARK of the proxy's sockets: the connect hook captures only into a listener that
    /// carries it (the mark exempts nothing: any pod with CAP_NET_ADMIN can set it).
    pub proxy_mark: u32,
    /// Non-zero once the agent has written this entry; until then nothing is captured.
    pub configured: u32,
}

/// Where a captured connection was really going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// Network namespace cookie of the pod that called connect().
    pub netns_cookie: u64,
    /// Destination address (see the crate docs for the encoding).
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u16,
    pub _pad: u32,
}

/// Key of `NM_CONN_ORIG_DST`: the client end of a captured connection as the proxy's accepted
/// socket sees it (its peer address), qualified by the pod's network namespace because every
/// pod has its own loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Key of `NM_INBOUND_PODS` and `NM_INBOUND_LISTENERS`: one address of an enrolled pod
/// (encoded as in the crate docs). Pod addresses are unique on a node, so the address alone
/// names the pod whose network namespace a lookup runs in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub addr: [u32; 4],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u16,
    pub _pad: u16,
}

/// Key of `NM_DELIVERIES`: the source of a connection the proxy is opening to an application
/// with the client's address (a transparent socket). The inbound program leaves such
/// connections alone; the proxy removes the entry once the handshake is done.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u16,
}

/// `InboundPod::flags`: the pod refuses plaintext (peer authentication STRICT).
pub const INBOUND_STRICT: u32 = 1;
/// `InboundPod::flags`: UDP from outside the pod is dropped, except from port 53 (DNS
/// answers). Agents that predate the bit never set it, so the map keeps its name.
pub const INBOUND_UDP_DENY: u32 = 2;

/// Value of `NM_INBOUND_PODS`: how an enrolled pod treats plaintext TCP (and UDP) arriving
/// from outside.
/// The socket the kernel hands such connections to is the entry of `NM_INBOUND_LISTENERS`
/// under the same key; when it is missing (the agent is not running) a STRICT pod drops the
/// connection and a PERMISSIVE one lets it reach the application directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    pub flags: u32,
    pub _pad: u32,
}

/// DNS capture is on for the pod (`DnsPod::flags`).
pub const DNS_CAPTURE: u32 = 1;

/// Value of `NM_DNS_PODS`, keyed by the network namespace cookie of an enrolled pod whose
/// UDP DNS is captured. The agent writes `flags`; the programs write `resolver`, the last
/// resolver the pod addressed, where the agent forwards what it does not answer itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPod {
    pub flags: u32,
    pub _pad: u32,
    pub resolver: OriginalDst,
}

/// Key of the IPv4 exclusion LPM trie data (the address, network byte order).
pub type Ipv4Prefix = u32;
/// Key of the IPv6 exclusion LPM trie data (the address bytes).
pub type Ipv6Prefix = [u8; 16];

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all are repr(C), Copy, contain only integers, and have explicit padding fields.
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for CaptureConfig {}
    unsafe impl aya::Pod for DnsPod {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for ConnectionKey {}
    unsafe impl aya::Pod for InboundKey {}
    unsafe impl aya::Pod for InboundPod {}
    unsafe impl aya::Pod for DeliveryKey {}
}
