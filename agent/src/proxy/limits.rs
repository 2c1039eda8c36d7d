//! Per-pod bounds on the proxy's work, so that one pod cannot exhaust the node proxy for the
//! others: the connections a pod has through the proxy at once (outbound; plaintext arriving
//! at it, per client address and in all; HBONE tunnels to it, per peer identity), the TLS
//! handshakes in progress at its HBONE listener, per client address and in all (each also
//! bounded in time), and the node's connections to its kubelet probe ports, kept apart from
//! other plaintext. A connection over a bound is reset at once, counted in
//! `nodemesh_connections_refused_total{reason, pod}` and logged at most every 10 s per pod
//! and bound; nothing else notices.

use std::time::Duration;

use tokio::net::TcpStream;

use super::relay::reset;
pub use crate::bounds::{Budget, PerClient};
use crate::telemetry::metrics::Metrics;

/// TLS handshakes in progress at one pod's HBONE listener, in all.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;
/// TLS handshakes in progress at one pod's HBONE listener from one client address: a client
/// that opens connections and never completes them holds up only its own.
pub const MAX_PENDING_HANDSHAKES_PER_CLIENT: usize = 32;
/// Connections from the node to one pod's kubelet probe ports at once (the kubelet runs a
/// few probes per container, each one short connection).
pub const MAX_PROBE_CONNECTIONS: usize = 64;
/// One client address may hold at most this fraction of a pod's plaintext bound, so that it
/// takes at least this many clients to fill it.
const PLAINTEXT_SHARES: usize = 4;
/// How long an HBONE client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client address may hold of a pod's plaintext bound `limit`.
pub fn per_client_share(limit: usize) -> usize {
    (limit / PLAINTEXT_SHARES).max(1)
}

/// Resets `stream`, a connection of `pod` over `budget`; counts it, and logs it unless that
/// was done less than 10 s ago.
pub fn refuse(stream: &TcpStream, budget: &Budget, pod: &str, metrics: &Metrics) {
    metrics.refused(budget.reason, pod);
    if budget.log_refusal() {
        tracing::warn!(
            pod,
            bound = budget.reason,
            limit = budget.limit(),
            "connection reset: the pod is at its bound (logged at most every 10 s)"
        );
    }
    reset(stream);
}
