//! Map-key encoding shared with the kernel: any address and port round-trips through the
//! kernel's byte order, v4-mapped IPv6 keyed as IPv4.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use nodemesh::{datapath::socket_addr, proxy::outbound::connection_key};
use nodemesh_common::OriginalDst;

fuzz_target!(|input: ([u8; 16], u16, u64)| {
    let (octets, port, cookie) = input;
    let ip = Ipv6Addr::from(octets);
    let peer = SocketAddr::new(IpAddr::V6(ip), port);
    let key = connection_key(cookie, peer);
    let original = OriginalDst {
        netns_cookie: cookie,
        addr: key.addr,
        port: key.port,
        family: key.family,
        _pad: 0,
    };
    let expected = match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => peer,
    };
    assert_eq!(socket_addr(original), expected);
});
