//! The node proxy. Today: L4 passthrough of captured outbound connections.

pub mod outbound;
