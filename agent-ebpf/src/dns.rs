//! DNS capture: an enrolled pod's UDP datagrams to port 53 go to the agent's DNS listener on
//! the pod's own loopback, and its answers come back as if from the resolver the pod
//! addressed.
//!
//! - cgroup/sendmsg4 and sendmsg6 rewrite the destination of a datagram sent with an
//!   address (`sendto`, as `dig` does); cgroup/connect4 and connect6 (`connect.rs`) do the
//!   same for a UDP socket connected to port 53 (the C library's resolver).
//! - cgroup/recvmsg4 and recvmsg6 rewrite the source of what arrives from the DNS listener
//!   back to the resolver the socket addressed (the C library compares the two), and
//!   getpeername (`peername.rs`) reports it for a connected socket.
//!
//! Only pods the agent listed in `NM_DNS_PODS` are captured (per-pod opt-out, and the global
//! flag as `dns_port` 0). While the listener is missing (no agent), the fail mode applies as
//! for TCP: open sends to the resolver itself, closed fails with EPERM at once.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use nodemesh_common::{DNS_CAPTURE, FAMILY_V4};

use crate::{
    connect::{
        ALLOW, Destination, LOOPBACK_V4, LookupFamily, REFUSE, Transport, Verdict,
        caller_is_enrolled, capture_or_fail_mode, is_excluded_v4, proxy_socket_at, remember,
    },
    maps::{CAPTURE_CONFIG, DNS_PODS, EXCLUDED_PORTS, SOCKET_ORIGINAL_DST},
};

const IPPROTO_UDP: u32 = 17;
const SOCK_DGRAM: u32 = 2;
const DNS_PORT: u16 = 53;
/// recvmsg programs must let every datagram through.
const CONTINUE: i32 = 1;

/// A UDP socket addressing port 53.
#[inline(always)]
pub(crate) fn is_dns(ctx: &SockAddrContext, port: u16) -> bool {
    let (protocol, sock_type) = unsafe { ((*ctx.sock_addr).protocol, (*ctx.sock_addr).type_) };
    protocol == IPPROTO_UDP && sock_type == SOCK_DGRAM && port == DNS_PORT
}

/// Whether to steer this datagram (or connect) to the DNS listener, and its port.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    dest: &Destination,
    excluded_addr: bool,
    family: LookupFamily,
) -> Verdict {
    // The port from the stack: a reference to the constant would put it in .rodata, a map
    // of its own.
    if excluded_addr || unsafe { EXCLUDED_PORTS.get(&dest.port) }.is_some() {
        return Verdict::PassThrough;
    }
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return Verdict::PassThrough;
    };
    if config.configured == 0 || config.dns_port == 0 || !caller_is_enrolled() {
        return Verdict::PassThrough;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let captured = unsafe { DNS_PODS.get(&netns) }.is_some_and(|p| p.flags & DNS_CAPTURE != 0);
    if !captured {
        return Verdict::PassThrough;
    }
    let listening = proxy_socket_at(ctx, config, family, Transport::Udp, config.dns_port);
    capture_or_fail_mode(config, listening, config.dns_port)
}

/// Remembers the resolver for the socket (recvmsg, getpeername) and for the pod (where the
/// agent forwards).
#[inline(always)]
fn remember_resolver(ctx: &SockAddrContext, dest: &Destination) {
    let original = remember(ctx, dest);
    if let Some(pod) = DNS_PODS.get_ptr_mut(&original.netns_cookie) {
        unsafe { (*pod).resolver = original };
    }
}

/// An IPv4 datagram or connect to port 53.
#[inline(always)]
pub(crate) fn steer4(ctx: &SockAddrContext, dest: &Destination, excluded: bool) -> i32 {
    match decide(ctx, dest, excluded, LookupFamily::V4) {
        Verdict::PassThrough => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Capture { outbound_port } => {
            remember_resolver(ctx, dest);
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = LOOPBACK_V4.to_be();
            sa.user_port = u32::from(outbound_port.to_be());
            ALLOW
        }
    }
}

/// An IPv6 (or v4-mapped) datagram or connect to port 53.
#[inline(always)]
pub(crate) fn steer6(
    ctx: &SockAddrContext,
    dest: &Destination,
    excluded: bool,
    v4_mapped: bool,
) -> i32 {
    let family = if v4_mapped {
        LookupFamily::V4
    } else {
        LookupFamily::V6
    };
    match decide(ctx, dest, excluded, family) {
        Verdict::PassThrough => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Capture { outbound_port } => {
            remember_resolver(ctx, dest);
            let sa = unsafe { &mut *ctx.sock_addr };
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

#[cgroup_sock_addr(sendmsg4)]
pub fn nm_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let dest = Destination {
        addr: [sa.user_ip4, 0, 0, 0],
        port: u16::from_be(sa.user_port as u16),
        family: FAMILY_V4,
    };
    if !is_dns(&ctx, dest.port) {
        return ALLOW;
    }
    let excluded = u32::from_be(sa.user_ip4) >> 24 == 127 || is_excluded_v4(sa.user_ip4);
    steer4(&ctx, &dest, excluded)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn nm_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let ip6 = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    if !is_dns(&ctx, port) {
        return ALLOW;
    }
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && u32::from_be(ip6[2]) == 0xffff;
    if v4_mapped {
        let dest = Destination {
            addr: [ip6[3], 0, 0, 0],
            port,
            family: FAMILY_V4,
        };
        let excluded = u32::from_be(ip6[3]) >> 24 == 127 || is_excluded_v4(ip6[3]);
        return steer6(&ctx, &dest, excluded, true);
    }
    let loopback = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && u32::from_be(ip6[3]) == 1;
    let dest = Destination {
        addr: ip6,
        port,
        family: nodemesh_common::FAMILY_V6,
    };
    steer6(&ctx, &dest, loopback, false)
}

/// The DNS listener's port, when DNS capture is configured.
#[inline(always)]
fn dns_port() -> Option<u16> {
    CAPTURE_CONFIG
        .get(0)
        .map(|c| c.dns_port)
        .filter(|port| *port != 0)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn nm_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let from_listener = dns_port().is_some_and(|port| {
        u32::from_be(sa.user_ip4) == LOOPBACK_V4 && u16::from_be(sa.user_port as u16) == port
    });
    if !from_listener {
        return CONTINUE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(original) = unsafe { SOCKET_ORIGINAL_DST.get(&cookie) }
        && original.family == FAMILY_V4
    {
        sa.user_ip4 = original.addr[0];
        sa.user_port = u32::from(original.port.to_be());
    }
    CONTINUE
}

#[cgroup_sock_addr(recvmsg6)]
pub fn nm_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    let loopback6 = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && u32::from_be(ip6[3]) == 1;
    let loopback4 = ip6[0] == 0
        && ip6[1] == 0
        && u32::from_be(ip6[2]) == 0xffff
        && u32::from_be(ip6[3]) == LOOPBACK_V4;
    let from_listener = dns_port()
        .is_some_and(|port| (loopback6 || loopback4) && u16::from_be(sa.user_port as u16) == port);
    if !from_listener {
        return CONTINUE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(original) = unsafe { SOCKET_ORIGINAL_DST.get(&cookie) } {
        crate::peername::write_original6(&ctx, original);
    }
    CONTINUE
}
