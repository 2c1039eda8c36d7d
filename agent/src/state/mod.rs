//! What the mesh should look like on this node, computed from the cluster state.

pub mod membership;
pub mod services;
pub mod workloads;
