//! HBONE, the protocol between node proxies as Istio ambient defines it: a connection to a
//! meshed pod travels as an HTTP/2 CONNECT stream (`:authority` = original `ip:port`) inside
//! mutual TLS to the destination pod's HBONE listener (port 15008). The outbound side opens
//! streams with the `client`; the inbound side serves them (`proxy::inbound::hbone`); both
//! share what a CONNECT names (`connect`), the limits below and the errors (`error`).

pub mod client;
pub mod connect;
pub mod error;

pub use nodemesh_common::HBONE_PORT;

/// Concurrent streams the HBONE server allows on one connection (clients of this agent
/// open another connection after `MAX_STREAMS_PER_CONNECTION`).
pub const HBONE_SERVER_MAX_STREAMS: u32 = 1000;
