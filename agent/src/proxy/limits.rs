//! Per-pod bounds on the proxy's work, so that one pod cannot exhaust the node proxy for the
//! others: the connections a pod has through the proxy at once (outbound; plaintext arriving
//! at it, per client address and in all; HBONE tunnels to it, per peer identity), the TLS
//! handshakes in progress at its HBONE listener, per client address and in all (each also
//! bounded in time), and the node's connections to its kubelet probe ports, kept apart from
//! other plaintext. A connection over a bound is reset at once, counted in
//! `nodemesh_connections_refused_total{reason, pod}` and logged at most every 10 s per pod
//! and bound; nothing else notices.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::relay::reset;
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
/// At most one log line per pod and bound in this long.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One bound of one pod: `limit` permits of a semaphore, taken without waiting.
pub struct Budget {
    /// Names the bound in metrics and logs.
    pub reason: &'static str,
    limit: usize,
    permits: Arc<Semaphore>,
    last_logged: Mutex<Option<Instant>>,
}

/// Held while the connection (or handshake) it was taken for lasts; dropping it gives the
/// permit back.
pub type Slot = OwnedSemaphorePermit;

impl Budget {
    pub fn new(reason: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            reason,
            limit,
            // A limit beyond what a semaphore holds (`usize::MAX`: no bound) is no bound.
            permits: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            last_logged: Mutex::new(None),
        })
    }

    /// A slot, unless `limit` are taken.
    pub fn try_acquire(&self) -> Option<Slot> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a refusal should be logged now (rate-limited).
    pub fn log_refusal(&self) -> bool {
        let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// A bound per client (an address, a peer identity): `limit` each, within `total`.
pub struct PerClient<K = IpAddr> {
    total: Arc<Budget>,
    limit: usize,
    by_client: Mutex<HashMap<K, usize>>,
}

/// Held while the connection (or handshake) it was taken for lasts.
pub struct ClientSlot<K: Hash + Eq = IpAddr> {
    owner: Arc<PerClient<K>>,
    client: K,
    _total: Slot,
}

impl<K: Hash + Eq> Drop for ClientSlot<K> {
    fn drop(&mut self) {
        let mut by_client = self.owner.lock();
        if let Some(count) = by_client.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> PerClient<K> {
    pub fn new(reason: &'static str, limit: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Budget::new(reason, total),
            limit,
            by_client: Mutex::default(),
        })
    }

    /// A slot for `client`, unless it holds `limit` already or `total` are taken.
    pub fn try_acquire(self: &Arc<Self>, client: &K) -> Option<ClientSlot<K>> {
        let mut by_client = self.lock();
        let count = by_client.entry(client.clone()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        let Some(total) = self.total.try_acquire() else {
            if *count == 0 {
                by_client.remove(client);
            }
            return None;
        };
        *count += 1;
        Some(ClientSlot {
            owner: Arc::clone(self),
            client: client.clone(),
            _total: total,
        })
    }

    /// The bound as a whole, for refusing.
    pub fn budget(&self) -> &Budget {
        &self.total
    }

    /// What one client may hold.
    pub fn limit_per_client(&self) -> usize {
        self.limit
    }
}

impl<K: Hash + Eq> PerClient<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
        self.by_client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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
            limit = budget.limit,
            "connection reset: the pod is at its bound (logged at most every 10 s)"
        );
    }
    reset(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_come_back_when_dropped() {
        let budget = Budget::new("test", 2);
        let first = budget.try_acquire().expect("first");
        let second = budget.try_acquire().expect("second");
        assert!(budget.try_acquire().is_none(), "a third over a limit of 2");
        drop(first);
        let third = budget.try_acquire().expect("a slot came back");
        drop((second, third));
        assert_eq!(
            budget.permits.available_permits(),
            2,
            "every slot came back"
        );
    }

    #[test]
    fn an_unbounded_budget_gives_slots() {
        let budget = Budget::new("test", usize::MAX);
        assert!(budget.try_acquire().is_some());
        assert_eq!(budget.limit(), usize::MAX);
    }

    #[test]
    fn one_client_cannot_take_the_slots_of_others() {
        let handshakes = PerClient::new("test", 2, 3);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = handshakes.try_acquire(&a).expect("a 1");
        let a2 = handshakes.try_acquire(&a).expect("a 2");
        assert!(
            handshakes.try_acquire(&a).is_none(),
            "a is at its own bound"
        );
        let b1 = handshakes.try_acquire(&b).expect("b is not affected by a");
        assert!(
            handshakes.try_acquire(&c).is_none(),
            "the total bound holds"
        );
        assert!(
            !handshakes.lock().contains_key(&c),
            "a refused client leaves no entry"
        );
        drop(a1);
        let c1 = handshakes.try_acquire(&c).expect("a slot came back");
        drop((a2, b1, c1));
        assert!(handshakes.lock().is_empty(), "no entry left behind");
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let budget = Budget::new("test", 0);
        assert!(budget.log_refusal());
        assert!(!budget.log_refusal());
    }
}
