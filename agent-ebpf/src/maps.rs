//! The maps, pinned by name under the agent's bpffs directory so they outlive the agent.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, SockHash},
};
use nodemesh_common::{
    CaptureConfig, ConnectionKey, DeliveryKey, DnsPod, EnrolledPod, InboundKey, InboundPod,
    Ipv4Prefix, Ipv6Prefix, MAX_ENROLLED_PODS, MAX_INBOUND_ADDRESSES, MAX_TRACKED_SOCKETS,
    OriginalDst,
};

/// Pod-level cgroup id -> enrolment. Filled by the agent for pods of meshed namespaces.
#[map(name = "NM_ENROLLED_CGROUPS")]
pub static ENROLLED_CGROUPS: HashMap<u64, EnrolledPod> = HashMap::pinned(MAX_ENROLLED_PODS, 0);

#[map(name = "NM_CAPTURE_CONFIG")]
pub static CAPTURE_CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

/// Destination ports never captured (value unused).
#[map(name = "NM_EXCLUDED_PORTS")]
pub static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);

const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "NM_EXCLUDED_V4")]
pub static EXCLUDED_CIDRS_V4: LpmTrie<Ipv4Prefix, u8> = LpmTrie::pinned(1024, BPF_F_NO_PREALLOC);

#[map(name = "NM_EXCLUDED_V6")]
pub static EXCLUDED_CIDRS_V6: LpmTrie<Ipv6Prefix, u8> = LpmTrie::pinned(1024, BPF_F_NO_PREALLOC);

/// Socket cookie of a captured client socket -> where it was going. Read by getpeername and
/// by sock_ops; deleted when the socket closes.
#[map(name = "NM_SOCKET_ORIG_DST")]
pub static SOCKET_ORIGINAL_DST: LruHashMap<u64, OriginalDst> =
    LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);

/// Client end of a captured connection -> where it was going. Read (and deleted) by the proxy
/// when it accepts the connection.
#[map(name = "NM_CONN_ORIG_DST")]
pub static CONNECTION_ORIGINAL_DST: LruHashMap<ConnectionKey, OriginalDst> =
    LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);

/// Address of an enrolled pod -> how it treats plaintext arriving from outside.
#[map(name = "NM_INBOUND_PODS")]
pub static INBOUND_PODS: HashMap<InboundKey, InboundPod> =
    HashMap::pinned(MAX_INBOUND_ADDRESSES, 0);

/// Address of an enrolled pod -> the proxy's plaintext listener inside that pod. Entries
/// vanish when the agent closes the socket (or dies).
#[map(name = "NM_INBOUND_LISTENERS")]
pub static INBOUND_LISTENERS: SockHash<InboundKey> = SockHash::pinned(MAX_INBOUND_ADDRESSES, 0);

/// Sources of the proxy's transparent connections to applications being opened right now
/// (value unused). LRU so that an entry a crashed agent left behind is eventually evicted.
#[map(name = "NM_DELIVERIES")]
pub static DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);

/// Network namespace cookie of an enrolled pod whose UDP DNS is captured -> its flags and the
/// resolver it last addressed (the programs write that; the agent forwards there).
#[map(name = "NM_DNS_PODS")]
pub static DNS_PODS: HashMap<u64, DnsPod> = HashMap::pinned(MAX_ENROLLED_PODS, 0);
