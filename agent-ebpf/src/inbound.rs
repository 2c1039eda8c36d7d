//! sk_lookup, attached to each enrolled pod's network namespace: plaintext TCP arriving from
//! outside the pod is handed to the proxy's plaintext listener in the pod, which applies the
//! namespace's peer-authentication mode (STRICT refuses, PERMISSIVE delivers and counts).
//!
//! Left alone: anything but TCP, the HBONE port (mTLS is what STRICT asks for), connections
//! from the pod's own address (the pod talking to itself, and the proxy delivering to the
//! application), and connections routed over loopback (the proxy's source-preserving
//! delivery, which policy routing in the pod sends through `lo`). Note that a connection to
//! the pod's own address does *not* report `lo` as its ingress interface: the kernel records
//! the device the local route points at. The accepted socket keeps the original destination
//! as its local address.

use core::ptr::read_volatile;

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use nodemesh_common::{
    FAMILY_V4, FAMILY_V6, HBONE_PORT, INBOUND_STRICT, InboundKey, LOOPBACK_IFINDEX,
};

use crate::maps::{INBOUND_LISTENERS, INBOUND_PODS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_lookup]
pub fn nm_inbound_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context; the verifier checks every field access.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP
        || lookup.local_port == u32::from(HBONE_PORT)
        || lookup.ingress_ifindex == LOOPBACK_IFINDEX
    {
        return SK_PASS;
    }
    // Volatile reads at fixed offsets: the verifier refuses a load through a context pointer
    // the compiler has offset and shared between the two branches.
    // SAFETY: fields of the valid context, read in place.
    // A connection from the pod's own address is the pod talking to itself, or the proxy
    // delivering to the application: never captured.
    let key = match lookup.family {
        AF_INET => {
            let (local, remote) = unsafe {
                (
                    read_volatile(&raw const lookup.local_ip4),
                    read_volatile(&raw const lookup.remote_ip4),
                )
            };
            if local == remote {
                return SK_PASS;
            }
            InboundKey {
                addr: [local, 0, 0, 0],
                family: FAMILY_V4,
                _pad: 0,
            }
        }
        AF_INET6 => {
            let (local, remote) = unsafe {
                (
                    [
                        read_volatile(&raw const lookup.local_ip6[0]),
                        read_volatile(&raw const lookup.local_ip6[1]),
                        read_volatile(&raw const lookup.local_ip6[2]),
                        read_volatile(&raw const lookup.local_ip6[3]),
                    ],
                    [
                        read_volatile(&raw const lookup.remote_ip6[0]),
                        read_volatile(&raw const lookup.remote_ip6[1]),
                        read_volatile(&raw const lookup.remote_ip6[2]),
                        read_volatile(&raw const lookup.remote_ip6[3]),
                    ],
                )
            };
            if local == remote {
                return SK_PASS;
            }
            InboundKey {
                addr: local,
                family: FAMILY_V6,
                _pad: 0,
            }
        }
        _ => return SK_PASS,
    };
    // SAFETY: a plain map lookup; the value is copied out at once.
    let Some(pod) = (unsafe { INBOUND_PODS.get(&key) }).copied() else {
        return SK_PASS;
    };
    if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, &key, 0).is_ok() {
        return SK_PASS;
    }
    // No proxy listener: the agent is not running. A STRICT pod stays closed to plaintext.
    if pod.flags & INBOUND_STRICT != 0 {
        SK_DROP
    } else {
        SK_PASS
    }
}
