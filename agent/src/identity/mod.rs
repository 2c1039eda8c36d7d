//! Workload identity: SPIFFE IDs, the nodemesh CA (issuer and HTTPS service), and the agent's
//! side (CA client and the manager that keeps one certificate per local identity fresh).

pub mod ca_auth;
pub mod ca_client;
pub mod ca_server;
pub mod issuer;
pub mod manager;
pub mod spiffe;
pub mod tls;

#[cfg(test)]
mod tests;
