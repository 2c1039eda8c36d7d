//! The node proxy: outbound capture, HBONE (mutual TLS between pods) and its inbound side.

mod counting;
pub mod hbone;
pub mod inbound;
pub mod outbound;
mod relay;
