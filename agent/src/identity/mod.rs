//! Workload identity on the agent's side: SPIFFE IDs, TLS configurations, the CA client and
//! the manager that keeps one certificate per local identity fresh. The CA itself, a separate
//! program (`nodemesh ca`), is `crate::ca`; it uses this module, never the other way round.

pub mod ca_client;
pub mod manager;
pub mod spiffe;
pub mod tls;
