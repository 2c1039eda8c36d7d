//! The node proxy: outbound capture, HBONE (mutual TLS between pods) and its inbound side,
//! and plaintext arriving at meshed pods.

mod counting;
mod delivery;
pub mod detect;
mod dial;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod limits;
mod listener;
pub mod outbound;
pub mod plaintext;
mod relay;
mod revocation;
