//! The node proxy. A connection's path reads one way, top to bottom:
//!
//! - `outbound`: connections meshed pods make, captured, forwarded (L4) or served per
//!   request (L7), to their destination directly or through HBONE;
//! - `hbone`: the protocol between node proxies (client, CONNECT target, limits, errors);
//! - `inbound`: connections arriving at meshed pods (HBONE server, plaintext), authorized and
//!   delivered to the application.
//!
//! Below all three: sockets in a pod (`dial`), the accept loop (`listener`), relaying with
//! exact counts (`relay`, `counting`), the socket pair between the two sides of the agent
//! on one node (`socket_pair`), protocol detection (`detect`), per-pod bounds (`limits`),
//! and HTTP serving and answers (`http`).

mod counting;
pub mod detect;
mod dial;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod limits;
mod listener;
pub mod outbound;
mod relay;
mod socket_pair;
