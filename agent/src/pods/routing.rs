//! Policy routing inside a meshed pod so the proxy can deliver inbound connections with the
//! client's own source address (a transparent socket bound to a non-local address).
//!
//! The application's replies to such a connection go to an address that is not in the pod;
//! without help they would leave through eth0. Three per-namespace settings, no iptables:
//! - `net.ipv4.tcp_fwmark_accept = 1`: an accepted socket takes the mark of the SYN that
//!   created it, so the application's socket carries the proxy's transparent mark;
//! - `net.ipv4.fwmark_reflect` / `net.ipv6.fwmark_reflect = 1`: resets and ICMP the kernel
//!   sends on a socket's behalf carry it too;
//! - a rule `fwmark <mark> lookup <table>` and, in that table, `local default dev lo` (IPv4
//!   and IPv6): marked packets are delivered locally, to the proxy's transparent socket.
//!
//! Netlink messages are built here directly: two message types with three attributes each
//! do not justify a netlink library. The sysctls are written under the node's
//! `/proc/sys/net` as the agent has it mounted (`--proc-sys-net`): the files there show the
//! network namespace of the thread that opens them, here the pod's.

use std::{
    io,
    mem::size_of,
    path::{Path, PathBuf},
};

use crate::netns::{NetnsError, NetnsSockets, SourcePreservation};

/// Routing table (in the pod) holding the `local default dev lo` routes.
pub const ROUTE_TABLE: u32 = 0x4e4d;
/// Priority of the rule sending marked packets to [`ROUTE_TABLE`] (before `main` at 32766).
pub const RULE_PRIORITY: u32 = 0x4e4d;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("setting {} in the pod: {source}", path.display())]
    Sysctl { path: PathBuf, source: io::Error },
    #[error("adding the IPv{version} {what} in the pod: {source}")]
    Netlink {
        version: u8,
        what: &'static str,
        source: io::Error,
    },
}

/// Installs the rules and routes in the pod (idempotent: existing entries are kept). IPv6 is
/// set up only for pods with an IPv6 address; a failure there leaves IPv4 working.
pub fn enable_source_preservation(
    sockets: &NetnsSockets,
    mark: u32,
    proc_sys_net: &Path,
    with_ipv6: bool,
) -> Result<SourcePreservation, RoutingError> {
    sockets.run_inside(|| {
        for sysctl in ["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect"] {
            write_sysctl(proc_sys_net, sysctl, "1")?;
        }
        family_entries(libc::AF_INET as u8, 4, mark, Op::Create)?;
        let ipv6 = with_ipv6
            && match write_sysctl(proc_sys_net, "ipv6/fwmark_reflect", "1")
                .and_then(|()| family_entries(libc::AF_INET6 as u8, 6, mark, Op::Create))
            {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%error, "IPv6 connections will reach this pod from the pod's own address");
                    false
                }
            };
        Ok(SourcePreservation { ipv4: true, ipv6 })
    })?
}

/// Removes what [`enable_source_preservation`] installed and puts the sysctls back to the
/// kernel's defaults, so an un-enrolled pod keeps nothing of the mesh. Entries already gone
/// are fine.
pub fn disable_source_preservation(
    sockets: &NetnsSockets,
    mark: u32,
    proc_sys_net: &Path,
    with_ipv6: bool,
) -> Result<(), RoutingError> {
    sockets.run_inside(|| {
        family_entries(libc::AF_INET as u8, 4, mark, Op::Delete)?;
        let mut sysctls = vec!["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect"];
        if with_ipv6 {
            family_entries(libc::AF_INET6 as u8, 6, mark, Op::Delete)?;
            sysctls.push("ipv6/fwmark_reflect");
        }
        for sysctl in sysctls {
            write_sysctl(proc_sys_net, sysctl, "0")?;
        }
        Ok(())
    })?
}

/// Writes `proc_sys_net/<sysctl>` (in the calling thread's network namespace).
fn write_sysctl(proc_sys_net: &Path, sysctl: &str, value: &str) -> Result<(), RoutingError> {
    let path = proc_sys_net.join(sysctl);
    std::fs::write(&path, value).map_err(|source| RoutingError::Sysctl { path, source })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Delete,
}

/// The rule and the route of one family, created or deleted.
fn family_entries(family: u8, version: u8, mark: u32, op: Op) -> Result<(), RoutingError> {
    let (rule_kind, route_kind) = match op {
        Op::Create => (libc::RTM_NEWRULE, libc::RTM_NEWROUTE),
        Op::Delete => (libc::RTM_DELRULE, libc::RTM_DELROUTE),
    };
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let rule = [family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    netlink_request(
        rule_kind,
        op,
        &rule,
        &[
            (FRA_PRIORITY, RULE_PRIORITY),
            (FRA_FWMARK, mark),
            (FRA_FWMASK, u32::MAX),
            (FRA_TABLE, ROUTE_TABLE),
        ],
    )
    .map_err(|source| RoutingError::Netlink {
        version,
        what: "rule `fwmark <transparent mark> lookup <table>`",
        source,
    })?;
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let route = [
        family,
        0,
        0,
        0,
        0,
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    netlink_request(
        route_kind,
        op,
        &route,
        &[
            (libc::RTA_TABLE, ROUTE_TABLE),
            (libc::RTA_OIF, LOOPBACK_IFINDEX),
        ],
    )
    .map_err(|source| RoutingError::Netlink {
        version,
        what: "route `local default dev lo`",
        source,
    })
}

/// Sends one create or delete request (with u32 attributes) on a new NETLINK_ROUTE socket of
/// the current network namespace and waits for the kernel's answer; "exists already" (for a
/// create) and "does not exist" (for a delete) count as success.
fn netlink_request(
    kind: u16,
    op: Op,
    header: &[u8; 12],
    attributes: &[(u16, u32)],
) -> io::Result<()> {
    const NLMSG_HEADER: usize = 16;
    let length = NLMSG_HEADER + header.len() + attributes.len() * 8;
    let mut message = Vec::with_capacity(length);
    message.extend_from_slice(&(length as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    let flags = match op {
        Op::Create => NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        Op::Delete => NLM_F_REQUEST | NLM_F_ACK,
    };
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    message.extend_from_slice(header);
    for (kind, value) in attributes {
        message.extend_from_slice(&8u16.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&value.to_ne_bytes());
    }

    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        // SAFETY: a zeroed sockaddr_nl addressed to the kernel, and buffers of the sizes passed.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                fd,
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answer = [0u8; 1024];
        let received = unsafe { libc::recv(fd, answer.as_mut_ptr().cast(), answer.len(), 0) };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        parse_ack(&answer[..received as usize], op)
    })();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    result
}

/// The kernel's answer to a request with NLM_F_ACK: an NLMSG_ERROR whose code is 0 (done)
/// or a negative errno.
fn parse_ack(answer: &[u8], op: Op) -> io::Result<()> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    let kind = u16::from_ne_bytes(
        answer
            .get(4..6)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    if kind != NLMSG_ERROR {
        return Err(malformed());
    }
    let code = i32::from_ne_bytes(
        answer
            .get(16..20)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    match (-code, op) {
        (0, _) | (libc::EEXIST, Op::Create) | (libc::ENOENT | libc::ESRCH, Op::Delete) => Ok(()),
        (errno, _) => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(code: i32) -> Vec<u8> {
        let mut answer = vec![0u8; 36];
        answer[0..4].copy_from_slice(&36u32.to_ne_bytes());
        answer[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        answer[16..20].copy_from_slice(&code.to_ne_bytes());
        answer
    }

    #[test]
    fn acks_and_existing_entries_succeed_other_errors_do_not() {
        assert!(parse_ack(&ack(0), Op::Create).is_ok());
        assert!(parse_ack(&ack(-libc::EEXIST), Op::Create).is_ok());
        assert!(parse_ack(&ack(-libc::ENOENT), Op::Delete).is_ok());
        assert!(parse_ack(&ack(-libc::ENOENT), Op::Create).is_err());
        assert!(parse_ack(&ack(-libc::EEXIST), Op::Delete).is_err());
        let error = parse_ack(&ack(-libc::EPERM), Op::Create).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EPERM));
        assert!(parse_ack(&[0u8; 8], Op::Create).is_err(), "truncated");
    }
}
