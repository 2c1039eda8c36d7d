//! cgroup/getpeername4 and cgroup/getpeername6: a captured socket reports the address its
//! application dialled, not the proxy's loopback listener.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use nodemesh_common::{FAMILY_V4, OriginalDst};

use crate::maps::SOCKET_ORIGINAL_DST;

const CONTINUE: i32 = 1;

fn original_destination(ctx: &SockAddrContext) -> Option<OriginalDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    unsafe { SOCKET_ORIGINAL_DST.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn nm_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_destination(&ctx)
        && original.family == FAMILY_V4
    {
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = original.addr[0];
        sa.user_port = u32::from(original.port.to_be());
    }
    CONTINUE
}

#[cgroup_sock_addr(getpeername6)]
pub fn nm_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_destination(&ctx) {
        write_original6(&ctx, &original);
    }
    CONTINUE
}

/// Puts `original` in an AF_INET6 socket address of the context (getpeername6, recvmsg6).
#[inline(always)]
pub(crate) fn write_original6(ctx: &SockAddrContext, original: &OriginalDst) {
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip6 = if original.family == FAMILY_V4 {
        // The socket is AF_INET6 speaking IPv4: answer with the v4-mapped address.
        [0, 0, 0xffffu32.to_be(), original.addr[0]]
    } else {
        original.addr
    };
    sa.user_port = u32::from(original.port.to_be());
}
