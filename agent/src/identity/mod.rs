//! Workload identity: SPIFFE IDs, the nodemesh CA (issuer and HTTPS service), and the agent's
//! side (CA client and the manager that keeps one certificate per local identity fresh).

pub mod ca_auth;
pub mod ca_client;
pub mod ca_server;
pub mod eligibility;
pub mod issuer;
pub mod manager;
pub mod spiffe;
pub mod tls;
pub mod token_review;

#[cfg(test)]
mod tests;
