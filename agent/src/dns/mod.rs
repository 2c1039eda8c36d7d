//! DNS for meshed pods (docs/dns.md): the kernel programs steer a pod's UDP queries to port
//! 53 to a listener the agent opens on the pod's loopback (`agent-ebpf/src/dns.rs`);
//! `server` runs that listener, `answer` decides each query: answered from the cluster
//! state, or forwarded to the resolver the pod addressed.

pub mod answer;
pub mod server;
