//! Endpoint choice per request: power of two choices over a peak-EWMA of latency, with
//! outlier ejection.
//!
//! Each endpoint's cost is its latency estimate times (outstanding requests + 1). The
//! estimate jumps up to any slower observation at once (the peak) and decays towards faster
//! ones with a time constant, so a slow endpoint is avoided at once and forgiven gradually.
//! Two distinct candidates are drawn at random and the cheaper one is used: nearly as good as
//! comparing all, without herding every client onto the same "best" endpoint.
//!
//! An endpoint that fails `EJECT_AFTER` times in a row (a 5xx response, or no connection) is
//! ejected for a base time multiplied by the number of times it has been ejected (capped),
//! then re-admitted; one success resets both counts. If every candidate is ejected the
//! choice ignores ejection (panic mode, as Envoy does): some traffic beats none.
//!
//! Why not `tower::balance::p2c` with its `PeakEwma`: tower's balancer is one instance per
//! client that owns its endpoints as a `Discover` stream of `Service`s and polls each for
//! readiness. Here the endpoints are a slice looked up per request in the node's shared
//! Service index, one balancer state serves every pod of the node (what one client learns
//! about a slow endpoint, the next one uses), and ejection after consecutive failures,
//! which tower has no notion of, is part of the choice. Wrapping every endpoint in a tower
//! `Service` per client would duplicate the state per client and add a readiness poll per
//! request, for the same two-choice rule.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Consecutive failures that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
const BASE_EJECTION: Duration = Duration::from_secs(10);
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// The EWMA's time constant.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint with no observation yet.
const DEFAULT_LATENCY: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct EndpointState {
    latency_ns: f64,
    updated: Instant,
    outstanding: u32,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl EndpointState {
    fn new(now: Instant) -> Self {
        Self {
            latency_ns: DEFAULT_LATENCY.as_nanos() as f64,
            updated: now,
            outstanding: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    fn cost(&self) -> f64 {
        self.latency_ns * f64::from(self.outstanding + 1)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// How a request to an endpoint went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx response, a failed connection or a reset.
    Failure,
}

/// Node-wide: every client of an endpoint sees the same health.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
}

/// An endpoint as the config dump shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EndpointView {
    pub endpoint: SocketAddr,
    pub latency_ms: f64,
    pub outstanding: u32,
    pub consecutive_failures: u32,
    pub ejected: bool,
}

impl Balancer {
    /// Chooses among `candidates` with two random draws `draws`; counts the request as
    /// outstanding until `finish` is called for it.
    pub fn pick(&self, candidates: &[SocketAddr], draws: (u64, u64)) -> Option<SocketAddr> {
        self.pick_at(candidates, draws, Instant::now())
    }

    fn pick_at(
        &self,
        candidates: &[SocketAddr],
        draws: (u64, u64),
        now: Instant,
    ) -> Option<SocketAddr> {
        let mut endpoints = self.lock();
        let healthy: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|addr| !endpoints.get(addr).is_some_and(|e| e.ejected(now)))
            .collect();
        let pool = if healthy.is_empty() {
            candidates
        } else {
            &healthy
        };
        let chosen = match pool.len() {
            0 => return None,
            1 => pool[0],
            n => {
                let first = (draws.0 % n as u64) as usize;
                // A second, distinct index.
                let second = (first + 1 + (draws.1 % (n as u64 - 1)) as usize) % n;
                let cost = |addr: &SocketAddr| {
                    endpoints
                        .get(addr)
                        .map_or(DEFAULT_LATENCY.as_nanos() as f64, EndpointState::cost)
                };
                if cost(&pool[second]) < cost(&pool[first]) {
                    pool[second]
                } else {
                    pool[first]
                }
            }
        };
        endpoints
            .entry(chosen)
            .or_insert_with(|| EndpointState::new(now))
            .outstanding += 1;
        Some(chosen)
    }

    /// Records the end of a request picked with `pick`.
    pub fn finish(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome) {
        self.finish_at(endpoint, latency, outcome, Instant::now());
    }

    fn finish_at(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome, now: Instant) {
        let mut endpoints = self.lock();
        let state = endpoints
            .entry(endpoint)
            .or_insert_with(|| EndpointState::new(now));
        state.outstanding = state.outstanding.saturating_sub(1);
        let observed = latency.as_nanos() as f64;
        if observed > state.latency_ns {
            state.latency_ns = observed;
        } else {
            let elapsed = now.saturating_duration_since(state.updated).as_secs_f64();
            let weight = (-elapsed / DECAY.as_secs_f64()).exp();
            state.latency_ns = state.latency_ns * weight + observed * (1.0 - weight);
        }
        state.updated = now;
        match outcome {
            Outcome::Success => {
                state.consecutive_failures = 0;
                state.ejections = 0;
            }
            Outcome::Failure => {
                state.consecutive_failures += 1;
                if state.consecutive_failures >= EJECT_AFTER && !state.ejected(now) {
                    state.ejections += 1;
                    let time = (BASE_EJECTION * state.ejections).min(MAX_EJECTION);
                    state.ejected_until = Some(now + time);
                    state.consecutive_failures = 0;
                    tracing::warn!(%endpoint, ejected_for = ?time, "outlier ejection: {EJECT_AFTER} consecutive failures");
                }
            }
        }
    }

    /// Forgets endpoints that are no longer anyone's candidate.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        self.lock()
            .retain(|addr, state| live(addr) || state.outstanding > 0);
    }

    pub fn views(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        let mut views: Vec<EndpointView> = self
            .lock()
            .iter()
            .map(|(addr, state)| EndpointView {
                endpoint: *addr,
                latency_ms: state.latency_ns / 1e6,
                outstanding: state.outstanding,
                consecutive_failures: state.consecutive_failures,
                ejected: state.ejected(now),
            })
            .collect();
        views.sort_by_key(|v| v.endpoint);
        views
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, EndpointState>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> [SocketAddr; 3] {
        [
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        ]
    }

    #[test]
    fn the_faster_of_two_wins_and_draws_are_distinct() {
        let balancer = Balancer::default();
        let [a, b, c] = addrs();
        let now = Instant::now();
        for (addr, ms) in [(a, 50), (b, 2), (c, 10)] {
            balancer.pick_at(&[addr], (0, 0), now);
            balancer.finish_at(addr, Duration::from_millis(ms), Outcome::Success, now);
        }
        // Draw 0 → a; the second draw is always another endpoint.
        assert_eq!(balancer.pick_at(&[a, b, c], (0, 0), now), Some(b));
        balancer.finish_at(b, Duration::from_millis(2), Outcome::Success, now);
        assert_eq!(balancer.pick_at(&[a, b, c], (0, 1), now), Some(c));
        balancer.finish_at(c, Duration::from_millis(10), Outcome::Success, now);
        // Outstanding requests raise the cost: b with 10 in flight costs 22 ms > c's 10 ms.
        for _ in 0..10 {
            balancer.pick_at(&[b], (0, 0), now);
        }
        assert_eq!(balancer.pick_at(&[a, b, c], (1, 0), now), Some(c));
    }

    #[test]
    fn the_peak_is_taken_at_once_and_forgotten_gradually() {
        let balancer = Balancer::default();
        let [a, ..] = addrs();
        let now = Instant::now();
        balancer.pick_at(&[a], (0, 0), now);
        balancer.finish_at(a, Duration::from_millis(100), Outcome::Success, now);
        assert_eq!(balancer.views()[0].latency_ms, 100.0);
        balancer.pick_at(&[a], (0, 0), now);
        balancer.finish_at(a, Duration::from_millis(1), Outcome::Success, now + DECAY);
        let after = balancer.views()[0].latency_ms;
        // One time constant: 100·e^-1 + 1·(1 − e^-1) ≈ 37.4 ms.
        assert!((after - 37.4).abs() < 0.1, "{after}");
    }

    #[test]
    fn consecutive_failures_eject_with_backoff_and_a_success_readmits() {
        let balancer = Balancer::default();
        let [a, b, _] = addrs();
        let now = Instant::now();
        let fail = |at: Instant| {
            for _ in 0..EJECT_AFTER {
                balancer.pick_at(&[a], (0, 0), at);
                balancer.finish_at(a, Duration::from_millis(1), Outcome::Failure, at);
            }
        };
        fail(now);
        for draw in 0..20 {
            assert_eq!(balancer.pick_at(&[a, b], (draw, draw), now), Some(b));
        }
        // Every candidate ejected: panic mode still answers.
        assert_eq!(balancer.pick_at(&[a], (0, 0), now), Some(a));
        // Re-admitted after the base time; failing again ejects for twice as long.
        let later = now + BASE_EJECTION;
        assert!(!balancer.lock()[&a].ejected(later));
        fail(later);
        assert!(balancer.lock()[&a].ejected(later + BASE_EJECTION));
        assert!(!balancer.lock()[&a].ejected(later + BASE_EJECTION * 2));
        // A success resets the count of ejections.
        balancer.finish_at(a, Duration::from_millis(1), Outcome::Success, later);
        assert_eq!(balancer.lock()[&a].ejections, 0);
    }
}
