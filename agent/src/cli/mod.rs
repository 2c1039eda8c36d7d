//! Operator commands that read a node agent's admin API: `nodemesh status` (this node's pods,
//! identities and health) and `nodemesh top` (live request rates and latencies).

pub mod admin_client;
pub mod prometheus;
pub mod status;
pub mod top;

/// Where the admin API listens unless told otherwise (the agent's default).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";
