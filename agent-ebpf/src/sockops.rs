//! sock_ops: when a captured client socket becomes established, publish its original
//! destination under the client's address, which is what the proxy's accepted socket sees as
//! its peer; forget the socket when it closes.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use nodemesh_common::{ConnectionKey, FAMILY_V4, FAMILY_V6};

use crate::maps::{CONNECTION_ORIGINAL_DST, SOCKET_ORIGINAL_DST};

const AF_INET6: u32 = 10;
const TCP_CLOSE: u32 = 7;
const CONTINUE: u32 = 1;

#[sock_ops]
pub fn nm_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let _ = SOCKET_ORIGINAL_DST.remove(&cookie);
        }
        _ => {}
    }
    CONTINUE
}

fn on_established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(original) = (unsafe { SOCKET_ORIGINAL_DST.get(&cookie) }).copied() else {
        return;
    };
    let (addr, family) = if ctx.family() == AF_INET6 {
        let ip6 = ctx.local_ip6();
        if ip6[0] == 0 && ip6[1] == 0 && u32::from_be(ip6[2]) == 0xffff {
            // v4-mapped: the proxy's IPv4 listener sees a plain IPv4 peer.
            ([ip6[3], 0, 0, 0], FAMILY_V4)
        } else {
            (ip6, FAMILY_V6)
        }
    } else {
        ([ctx.local_ip4(), 0, 0, 0], FAMILY_V4)
    };
    let key = ConnectionKey {
        netns_cookie: original.netns_cookie,
        addr,
        port: ctx.local_port() as u16,
        family,
        _pad: 0,
    };
    let _ = CONNECTION_ORIGINAL_DST.insert(&key, &original, 0);
    // Ask for state callbacks so the socket's entry is removed when it closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}
