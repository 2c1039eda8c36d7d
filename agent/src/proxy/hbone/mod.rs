//! HBONE, the protocol between node proxies as Istio ambient defines it: a connection to a
//! meshed pod travels as an HTTP/2 CONNECT stream (`:authority` = original `ip:port`) inside
//! mutual TLS to the destination pod's HBONE listener (port 15008). The outbound side opens
//! streams with the `client`; the inbound side serves them (`proxy::inbound::hbone`); both
//! share what a CONNECT names (`connect`), a tunnel's byte stream (`stream`), the settings
//! and limits below and the errors (`error`). HTTP/2 is h2's, used directly: `stream` says
//! why not hyper's.

pub mod client;
pub mod connect;
pub mod error;
pub mod stream;

pub use nodemesh_common::HBONE_PORT;

/// Concurrent streams the HBONE server allows on one connection (clients of this agent
/// open another connection after `MAX_STREAMS_PER_CONNECTION`).
pub const HBONE_SERVER_MAX_STREAMS: u32 = 1000;

/// Flow-control windows and buffers of HBONE's HTTP/2 connections, as hyper's defaults were
/// when HBONE ran on hyper (client: 2 MiB per stream, 5 MiB per connection, 1 MiB send
/// buffer; server: 1 MiB, 1 MiB, 400 KiB). Windows are credit, not memory: a stream holds
/// only what arrived and was not read yet.
pub const CLIENT_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
pub const CLIENT_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
pub const CLIENT_SEND_BUFFER: usize = 1024 * 1024;
pub const SERVER_STREAM_WINDOW: u32 = 1024 * 1024;
pub const SERVER_CONNECTION_WINDOW: u32 = 1024 * 1024;
pub const SERVER_SEND_BUFFER: usize = 400 * 1024;
/// A CONNECT's headers are small; 16 KiB bounds what a peer can make us hold.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams this side reset that h2 remembers (for 1 s) so that frames still in flight for
/// them are dropped quietly. h2's default, 50, was made for a server that rarely resets; a
/// tunnel is reset whenever its TCP end is, thousands of times a second on a busy pooled
/// connection, and a frame for a stream it has forgotten is answered with a reset that
/// counts towards h2's lifetime limit of such errors (1,024), past which it closes the
/// whole connection with every tunnel on it.
pub const RESET_STREAMS_KEPT: usize = 10_000;
