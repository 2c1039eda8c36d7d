//! The nodemesh CA (`nodemesh ca serve`, `nodemesh ca init`): a program of its own beside the
//! agent. `server` serves HTTPS, `auth` and `token_review` authenticate the calling agent to a
//! node, `eligibility` decides whether that node may have a pod's certificate, `issuer` signs
//! it. It speaks the agent's `identity::ca_client` request and uses `identity::{spiffe, tls}`.
//! With `--kubernetes` it also sweeps the agents' MeshNode objects (`mesh_nodes`).

pub mod auth;
pub mod eligibility;
pub mod issuer;
pub mod mesh_nodes;
pub mod server;
pub mod token_review;

#[cfg(test)]
mod tests;
