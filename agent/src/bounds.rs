//! Bounds on concurrent work, counted in slots that are given back when dropped: one bound
//! ([`Budget`]), or one per client within a total ([`PerClient`]). The proxy bounds each
//! pod's connections with them (`proxy::limits`); the servers that anyone can reach bound
//! their connections per source address with them (`serving`).

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most one log line of a kind in this long.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One bound: `limit` permits of a semaphore, taken without waiting.
pub struct Budget {
    /// Names the bound in metrics and logs.
    pub reason: &'static str,
    limit: usize,
    permits: Arc<Semaphore>,
    refusals_logged: LogThrottle,
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
            refusals_logged: LogThrottle::default(),
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
        self.refusals_logged.ready()
    }
}

/// Lets one log line of a kind through every 10 s, so that a flood does not flood the log.
#[derive(Default)]
pub struct LogThrottle(Mutex<Option<Instant>>);

impl LogThrottle {
    /// Whether to log now.
    pub fn ready(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// What a client address counts as where clients are bounded by address: the address, or
/// for IPv6 its /64, which one host commonly holds whole.
pub fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
        v4 => v4,
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
    fn ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4() {
        let host = |text: &str| per_host(text.parse().unwrap()).to_string();
        assert_eq!(host("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(host("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_eq!(host("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(host("::ffff:198.18.0.7"), "198.18.0.7");
        assert_eq!(host("198.18.0.7"), "198.18.0.7");
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let budget = Budget::new("test", 0);
        assert!(budget.log_refusal());
        assert!(!budget.log_refusal());
    }
}
