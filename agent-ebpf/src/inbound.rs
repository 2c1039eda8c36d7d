//! sk_lookup, attached to each enrolled pod's network namespace: plaintext TCP arriving from
//! outside the pod is handed to the proxy's plaintext listener in the pod, which applies the
//! namespace's peer-authentication mode (STRICT refuses, PERMISSIVE delivers and counts).
//!
//! UDP is left alone unless the pod denies it (`INBOUND_UDP_DENY`, namespace label
//! `nodemesh.io/inbound-udp=deny`): then a datagram from outside the pod is dropped, except
//! from port 53 (answers of the resolvers the pod asked). Datagrams to a connected socket
//! never get here (the kernel matches those before it runs sk_lookup), so replies to the
//! pod's own UDP flows keep flowing; addresses other than the pod's (its loopback, where DNS
//! capture answers) are not in the map.
//!
//! Left alone otherwise: anything but TCP and UDP, the HBONE port (mTLS is what STRICT asks for), connections
//! from the pod's own address (the pod talking to itself), and the proxy's own deliveries to
//! the application, which carry the client's address as their source and are listed in
//! `NM_DELIVERIES` while they are being opened. (The ingress interface cannot tell these
//! apart: a connection to the pod's own address reports the device of the local route, eth0,
//! not lo.) The accepted socket keeps the original destination as its local address.

use core::ptr::read_volatile;

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use nodemesh_common::{
    DeliveryKey, FAMILY_V4, FAMILY_V6, HBONE_PORT, INBOUND_STRICT, INBOUND_UDP_DENY, InboundKey,
};

use crate::maps::{DELIVERIES, INBOUND_LISTENERS, INBOUND_PODS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_lookup]
pub fn nm_inbound_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context; the verifier checks every field access.
    let lookup = unsafe { &*ctx.lookup };
    let udp = match lookup.protocol {
        IPPROTO_TCP if lookup.local_port != u32::from(HBONE_PORT) => false,
        IPPROTO_UDP => true,
        _ => return SK_PASS,
    };
    // SAFETY: as above; the port is in network byte order.
    let remote_port = u16::from_be(unsafe { read_volatile(&raw const lookup.remote_port) });
    if udp && remote_port == DNS_PORT {
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
            if local == remote || is_delivery([remote, 0, 0, 0], remote_port, FAMILY_V4) {
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
            if local == remote || is_delivery(remote, remote_port, FAMILY_V6) {
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
    if udp {
        return if pod.flags & INBOUND_UDP_DENY != 0 {
            SK_DROP
        } else {
            SK_PASS
        };
    }
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

/// Whether the connection comes from one of the proxy's transparent delivery sockets.
#[inline(always)]
fn is_delivery(addr: [u32; 4], port: u16, family: u16) -> bool {
    let key = DeliveryKey { addr, port, family };
    // SAFETY: a plain map lookup; only presence matters.
    unsafe { DELIVERIES.get(&key) }.is_some()
}
