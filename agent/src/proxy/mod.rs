//! The node proxy. Today: L4 passthrough of captured outbound connections.

mod counting;
pub mod outbound;
