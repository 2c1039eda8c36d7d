//! cgroup/connect4 and cgroup/connect6: send an enrolled pod's TCP connects to the proxy's
//! listener on the pod's own loopback, remembering where they were going. UDP sockets
//! connected to port 53 (the C library's resolver) go to the DNS listener (`dns.rs`).

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        generated::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use nodemesh_common::{
    CaptureConfig, FAMILY_V4, FAMILY_V6, FailMode, MAX_CGROUP_DEPTH, OriginalDst,
};

use crate::maps::{
    CAPTURE_CONFIG, ENROLLED_CGROUPS, EXCLUDED_CIDRS_V4, EXCLUDED_CIDRS_V6, EXCLUDED_PORTS,
    SOCKET_ORIGINAL_DST,
};

pub(crate) const ALLOW: i32 = 1;
pub(crate) const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
pub(crate) const LOOPBACK_V4: u32 = 0x7f00_0001;

/// Where a connect() (or a datagram) is going, decoded from the context.
pub(crate) struct Destination {
    pub(crate) addr: [u32; 4],
    pub(crate) port: u16,
    pub(crate) family: u16,
}

pub(crate) enum Verdict {
    PassThrough,
    Refuse,
    Capture { outbound_port: u16 },
}

#[cgroup_sock_addr(connect4)]
pub fn nm_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst_ip = u32::from_be(sa.user_ip4);
    let dest = Destination {
        addr: [sa.user_ip4, 0, 0, 0],
        port: u16::from_be(sa.user_port as u16),
        family: FAMILY_V4,
    };
    let excluded = dst_ip >> 24 == 127 || is_excluded_v4(sa.user_ip4);
    if crate::dns::is_dns(&ctx, dest.port) {
        return crate::dns::steer4(&ctx, &dest, excluded);
    }
    match decide(&ctx, &dest, excluded, LookupFamily::V4) {
        Verdict::PassThrough => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Capture { outbound_port } => {
            remember(&ctx, &dest);
            sa.user_ip4 = LOOPBACK_V4.to_be();
            sa.user_port = u32::from(outbound_port.to_be());
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn nm_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    // An AF_INET6 socket dialling ::ffff:a.b.c.d really speaks IPv4: capture it as IPv4.
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && u32::from_be(ip6[2]) == 0xffff;
    let (dest, excluded, lookup) = if v4_mapped {
        let dst_ip = u32::from_be(ip6[3]);
        let dest = Destination {
            addr: [ip6[3], 0, 0, 0],
            port,
            family: FAMILY_V4,
        };
        (
            dest,
            dst_ip >> 24 == 127 || is_excluded_v4(ip6[3]),
            LookupFamily::V4,
        )
    } else {
        let loopback = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && u32::from_be(ip6[3]) == 1;
        let dest = Destination {
            addr: ip6,
            port,
            family: FAMILY_V6,
        };
        (dest, loopback || is_excluded_v6(&ip6), LookupFamily::V6)
    };
    if crate::dns::is_dns(&ctx, dest.port) {
        return crate::dns::steer6(&ctx, &dest, excluded, v4_mapped);
    }
    match decide(&ctx, &dest, excluded, lookup) {
        Verdict::PassThrough => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Capture { outbound_port } => {
            remember(&ctx, &dest);
            sa.user_ip6 = if v4_mapped {
                [0, 0, 0xffffu32.to_be(), LOOPBACK_V4.to_be()]
            } else {
                [0, 0, 0, 1u32.to_be()]
            };
            sa.user_port = u32::from(outbound_port.to_be());
            ALLOW
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum LookupFamily {
    V4,
    V6,
}

#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    dest: &Destination,
    excluded_addr: bool,
    lookup: LookupFamily,
) -> Verdict {
    let (protocol, sock_type) = unsafe { ((*ctx.sock_addr).protocol, (*ctx.sock_addr).type_) };
    if protocol != IPPROTO_TCP || sock_type != SOCK_STREAM || excluded_addr {
        return Verdict::PassThrough;
    }
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return Verdict::PassThrough;
    };
    // The proxy's own sockets are not exempted by their mark, which any pod with
    // CAP_NET_ADMIN could set: the agent runs in a cgroup that is never enrolled.
    if config.configured == 0 || !caller_is_enrolled() {
        return Verdict::PassThrough;
    }
    if unsafe { EXCLUDED_PORTS.get(&dest.port) }.is_some() {
        return Verdict::PassThrough;
    }
    let listening = proxy_is_listening(ctx, config, lookup);
    capture_or_fail_mode(config, listening, config.outbound_port)
}

/// Capture into the proxy's listener at `port` when it is there, else the fail mode.
#[inline(always)]
pub(crate) fn capture_or_fail_mode(config: &CaptureConfig, listening: bool, port: u16) -> Verdict {
    if listening {
        Verdict::Capture {
            outbound_port: port,
        }
    } else if config.fail_mode == FailMode::Closed as u32 {
        Verdict::Refuse
    } else {
        Verdict::PassThrough
    }
}

/// The caller belongs to an enrolled pod when one of its cgroup's ancestors is enrolled
/// (the pod cgroup holds one child cgroup per container, and containers restart).
#[inline(always)]
pub(crate) fn caller_is_enrolled() -> bool {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if unsafe { ENROLLED_CGROUPS.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// The transport of a listener looked up by [`proxy_is_listening`].
#[derive(Clone, Copy)]
pub(crate) enum Transport {
    Tcp,
    Udp,
}

/// True when the pod's network namespace has the proxy's outbound listener (marked as ours).
#[inline(always)]
fn proxy_is_listening(ctx: &SockAddrContext, config: &CaptureConfig, family: LookupFamily) -> bool {
    proxy_socket_at(ctx, config, family, Transport::Tcp, config.outbound_port)
}

/// True when the pod's network namespace has a socket of the proxy (marked as ours) bound to
/// the loopback address of `family` and `port`.
#[inline(always)]
pub(crate) fn proxy_socket_at(
    ctx: &SockAddrContext,
    config: &CaptureConfig,
    family: LookupFamily,
    transport: Transport,
    port: u16,
) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match family {
        LookupFamily::V4 => {
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            t.daddr = LOOPBACK_V4.to_be();
            t.dport = port.to_be();
            core::mem::size_of_val(t)
        }
        LookupFamily::V6 => {
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            t.daddr = [0, 0, 0, 1u32.to_be()];
            t.dport = port.to_be();
            core::mem::size_of_val(t)
        }
    };
    let sk = unsafe {
        match transport {
            Transport::Tcp => bpf_sk_lookup_tcp(
                ctx.sock_addr.cast(),
                &mut tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            ),
            Transport::Udp => bpf_sk_lookup_udp(
                ctx.sock_addr.cast(),
                &mut tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            ),
        }
    };
    if sk.is_null() {
        return false;
    }
    let ours = unsafe { (*sk).mark } == config.proxy_mark;
    unsafe { bpf_sk_release(sk.cast()) };
    ours
}

#[inline(always)]
pub(crate) fn remember(ctx: &SockAddrContext, dest: &Destination) -> OriginalDst {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let original = OriginalDst {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        addr: dest.addr,
        port: dest.port,
        family: dest.family,
        _pad: 0,
    };
    // An LRU map evicts instead of failing, so the insert cannot fail for lack of room.
    let _ = SOCKET_ORIGINAL_DST.insert(&cookie, &original, 0);
    original
}

#[inline(always)]
pub(crate) fn is_excluded_v4(addr_be: u32) -> bool {
    let key = Key::new(32, addr_be);
    EXCLUDED_CIDRS_V4.get(&key).is_some()
}

#[inline(always)]
fn is_excluded_v6(addr_be: &[u32; 4]) -> bool {
    let mut bytes = [0u8; 16];
    for (i, word) in addr_be.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let key = Key::new(128, bytes);
    EXCLUDED_CIDRS_V6.get(&key).is_some()
}
