//! What the mesh should look like on this node, computed from the cluster state.

pub mod authorization;
pub mod membership;
pub mod node;
pub mod probes;
pub mod routes;
pub mod services;
pub mod workloads;
