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
//! With zones (`pick_zoned`), the two choices are made among the client's zone while its
//! endpoints average fewer than `ZonePolicy::spill_at` requests in flight; over that, only
//! what the zone's endpoints cannot take goes to other zones, until the average is back at
//! `recover_at`; a zone without a healthy endpoint fails over at once (docs/l7.md, Zones).
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
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
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
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<SocketAddr, EndpointState>,
    /// Service ports (`namespace/name:port`) whose requests spill out of the zone now.
    spilling: HashSet<String>,
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

/// When a Service port's requests leave the client's zone: once its zone's ready endpoints
/// carry `spill_at` requests each on average, until they are back to `recover_at` (the gap
/// is the hysteresis that keeps traffic from flapping between zones).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZonePolicy {
    pub spill_at: f64,
    pub recover_at: f64,
}

impl Default for ZonePolicy {
    fn default() -> Self {
        Self {
            spill_at: 4.0,
            recover_at: 2.0,
        }
    }
}

/// Where a zoned pick went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The node or the endpoints have no zone: the plain choice over every endpoint.
    Unzoned,
    /// An endpoint in the client's zone.
    Local,
    /// Another zone, and why.
    Spilled(SpillReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpillReason {
    /// No ready, non-ejected endpoint in the zone.
    Unavailable,
    /// The zone's endpoints are over the policy's load.
    Overloaded,
}

/// The endpoints of one Service port with their zones (`zones[i]` is `endpoints[i]`'s).
#[derive(Clone, Copy, Debug)]
pub struct Zoned<'a> {
    pub endpoints: &'a [SocketAddr],
    /// Empty when no endpoint has a zone.
    pub zones: &'a [Option<Arc<str>>],
}

impl Balancer {
    /// The plain choice among `candidates` (two random draws `draws`), counted as
    /// outstanding until `finish`: what `pick_zoned` does without zones.
    #[cfg(test)]
    fn pick_at(
        &self,
        candidates: &[SocketAddr],
        draws: (u64, u64),
        now: Instant,
    ) -> Option<SocketAddr> {
        let mut state = self.lock();
        let chosen = two_choices(&state.endpoints, candidates, draws, now)?;
        reserve(&mut state.endpoints, chosen, now);
        Some(chosen)
    }

    /// The choice among `candidates` of `service` (`namespace/name`) on `port`, with two
    /// random draws `draws`, counted as outstanding until `finish`. Zone-aware for a client
    /// in `local_zone`: the client's zone while its endpoints keep up, another zone when none
    /// is available or, under `policy`, they are overloaded (and then only for the requests
    /// the zone's least loaded endpoints cannot take).
    pub fn pick_zoned(
        &self,
        (service, port): (&str, u16),
        candidates: Zoned<'_>,
        local_zone: Option<&str>,
        policy: ZonePolicy,
        draws: (u64, u64),
    ) -> Option<(SocketAddr, Placement)> {
        let now = Instant::now();
        self.pick_zoned_at((service, port), candidates, local_zone, policy, draws, now)
    }

    fn pick_zoned_at(
        &self,
        (service, port): (&str, u16),
        candidates: Zoned<'_>,
        local_zone: Option<&str>,
        policy: ZonePolicy,
        draws: (u64, u64),
        now: Instant,
    ) -> Option<(SocketAddr, Placement)> {
        let mut state = self.lock();
        let zoned = candidates.zones.len() == candidates.endpoints.len()
            && candidates.zones.iter().any(Option::is_some);
        let Some(local_zone) = local_zone.filter(|_| zoned) else {
            let chosen = two_choices(&state.endpoints, candidates.endpoints, draws, now)?;
            reserve(&mut state.endpoints, chosen, now);
            return Some((chosen, Placement::Unzoned));
        };
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for (endpoint, zone) in candidates.endpoints.iter().zip(candidates.zones) {
            if zone.as_deref() == Some(local_zone) {
                if !state
                    .endpoints
                    .get(endpoint)
                    .is_some_and(|e| e.ejected(now))
                {
                    local.push(*endpoint);
                }
            } else {
                remote.push(*endpoint);
            }
        }
        let outstanding =
            |state: &State, e: &SocketAddr| state.endpoints.get(e).map_or(0, |e| e.outstanding);
        let placement = if remote.is_empty() {
            // Nowhere to spill to: the plain choice, ejection and panic mode included.
            local = candidates.endpoints.to_vec();
            Placement::Local
        } else if local.is_empty() {
            Placement::Spilled(SpillReason::Unavailable)
        } else {
            let load = local
                .iter()
                .map(|e| f64::from(outstanding(&state, e)))
                .sum::<f64>()
                / local.len() as f64;
            let key = format!("{service}:{port}");
            let spilling = match state.spilling.contains(&key) {
                true if load <= policy.recover_at => {
                    state.spilling.remove(&key);
                    tracing::info!(service = key, zone = local_zone, load, "back in the zone");
                    false
                }
                true => true,
                false if load >= policy.spill_at => {
                    state.spilling.insert(key.clone());
                    tracing::info!(
                        service = key,
                        zone = local_zone,
                        load,
                        "spilling to other zones"
                    );
                    true
                }
                false => false,
            };
            let in_zone = two_choices(&state.endpoints, &local, draws, now);
            match in_zone {
                Some(endpoint)
                    if !spilling || f64::from(outstanding(&state, &endpoint)) < policy.spill_at =>
                {
                    reserve(&mut state.endpoints, endpoint, now);
                    return Some((endpoint, Placement::Local));
                }
                _ => Placement::Spilled(SpillReason::Overloaded),
            }
        };
        let pool = if placement == Placement::Local {
            &local
        } else {
            &remote
        };
        let chosen = two_choices(&state.endpoints, pool, draws, now)?;
        reserve(&mut state.endpoints, chosen, now);
        Some((chosen, placement))
    }
    /// Records the end of a request picked with `pick` or `pick_zoned`.
    pub fn finish(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome) {
        self.finish_at(endpoint, latency, outcome, Instant::now());
    }

    fn finish_at(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome, now: Instant) {
        let mut guard = self.lock();
        let state = guard
            .endpoints
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
            .endpoints
            .retain(|addr, state| live(addr) || state.outstanding > 0);
    }

    pub fn views(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        let mut views: Vec<EndpointView> = self
            .lock()
            .endpoints
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

    /// The Service ports spilling out of the zone now.
    pub fn spilling(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock().spilling.iter().cloned().collect();
        keys.sort();
        keys
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Power of two choices over `candidates`, ejected ones left out unless every one is
/// (panic mode).
fn two_choices(
    endpoints: &HashMap<SocketAddr, EndpointState>,
    candidates: &[SocketAddr],
    draws: (u64, u64),
    now: Instant,
) -> Option<SocketAddr> {
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
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let first = (draws.0 % n as u64) as usize;
            // A second, distinct index.
            let second = (first + 1 + (draws.1 % (n as u64 - 1)) as usize) % n;
            let cost = |addr: &SocketAddr| {
                endpoints
                    .get(addr)
                    .map_or(DEFAULT_LATENCY.as_nanos() as f64, EndpointState::cost)
            };
            Some(if cost(&pool[second]) < cost(&pool[first]) {
                pool[second]
            } else {
                pool[first]
            })
        }
    }
}

/// Counts a request as outstanding on `endpoint`.
fn reserve(endpoints: &mut HashMap<SocketAddr, EndpointState>, endpoint: SocketAddr, now: Instant) {
    endpoints
        .entry(endpoint)
        .or_insert_with(|| EndpointState::new(now))
        .outstanding += 1;
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
        assert!(!balancer.lock().endpoints[&a].ejected(later));
        fail(later);
        assert!(balancer.lock().endpoints[&a].ejected(later + BASE_EJECTION));
        assert!(!balancer.lock().endpoints[&a].ejected(later + BASE_EJECTION * 2));
        // A success resets the count of ejections.
        balancer.finish_at(a, Duration::from_millis(1), Outcome::Success, later);
        assert_eq!(balancer.lock().endpoints[&a].ejections, 0);
    }

    /// One endpoint in zone `a` (the client's), ten in `b`.
    fn one_local_ten_remote() -> (Vec<SocketAddr>, Vec<Option<Arc<str>>>) {
        let endpoints: Vec<SocketAddr> = (1..=11)
            .map(|i| format!("10.0.1.{i}:80").parse().unwrap())
            .collect();
        let zones = (0..11)
            .map(|i| Some(Arc::from(if i == 0 { "a" } else { "b" })))
            .collect();
        (endpoints, zones)
    }

    #[test]
    fn a_zone_keeps_its_requests_until_it_is_overloaded_then_spills_the_excess_with_hysteresis() {
        let balancer = Balancer::default();
        let (endpoints, zones) = one_local_ten_remote();
        let zoned = Zoned {
            endpoints: &endpoints,
            zones: &zones,
        };
        let policy = ZonePolicy::default();
        let now = Instant::now();
        let pick = |draw: u64| {
            balancer
                .pick_zoned_at(
                    ("shop/web", 80),
                    zoned,
                    Some("a"),
                    policy,
                    (draw, draw + 3),
                    now,
                )
                .unwrap()
        };
        // Light load: the one local endpoint takes every request, although ten remote ones
        // are idle (plain two choices would send it about 1 in 6).
        for draw in 0..3 {
            assert_eq!(pick(draw), (endpoints[0], Placement::Local));
        }
        // The fourth in flight reaches `spill_at` (4): from then on what the local endpoint
        // cannot take at that load goes to the other zone.
        assert_eq!(pick(3), (endpoints[0], Placement::Local));
        for draw in 4..10 {
            let (endpoint, placement) = pick(draw);
            assert_eq!(placement, Placement::Spilled(SpillReason::Overloaded));
            assert_ne!(endpoint, endpoints[0]);
        }
        assert_eq!(balancer.spilling(), ["shop/web:80"]);
        // Hysteresis: at 3 in flight locally it still spills what would exceed 4 ...
        balancer.finish_at(
            endpoints[0],
            Duration::from_millis(1),
            Outcome::Success,
            now,
        );
        assert_eq!(pick(20), (endpoints[0], Placement::Local));
        let (_, placement) = pick(21);
        assert_eq!(placement, Placement::Spilled(SpillReason::Overloaded));
        // ... and returns only once the zone is down to `recover_at` (2).
        for _ in 0..2 {
            balancer.finish_at(
                endpoints[0],
                Duration::from_millis(1),
                Outcome::Success,
                now,
            );
        }
        assert_eq!(pick(30), (endpoints[0], Placement::Local));
        assert!(balancer.spilling().is_empty());
    }

    #[test]
    fn a_zone_without_a_healthy_endpoint_fails_over_and_unzoned_clients_are_unaffected() {
        let balancer = Balancer::default();
        let (endpoints, zones) = one_local_ten_remote();
        let zoned = Zoned {
            endpoints: &endpoints,
            zones: &zones,
        };
        let now = Instant::now();
        for _ in 0..EJECT_AFTER {
            balancer.pick_at(&[endpoints[0]], (0, 0), now);
            balancer.finish_at(
                endpoints[0],
                Duration::from_millis(1),
                Outcome::Failure,
                now,
            );
        }
        let (endpoint, placement) = balancer
            .pick_zoned_at(
                ("shop/web", 80),
                zoned,
                Some("a"),
                ZonePolicy::default(),
                (0, 1),
                now,
            )
            .unwrap();
        assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
        assert_ne!(endpoint, endpoints[0]);
        // A node without a zone label, or endpoints without zones: the plain choice.
        let (_, placement) = balancer
            .pick_zoned_at(
                ("shop/web", 80),
                zoned,
                None,
                ZonePolicy::default(),
                (0, 1),
                now,
            )
            .unwrap();
        assert_eq!(placement, Placement::Unzoned);
        let unzoned = Zoned {
            endpoints: &endpoints,
            zones: &[const { None }; 11],
        };
        let (_, placement) = balancer
            .pick_zoned_at(
                ("shop/web", 80),
                unzoned,
                Some("a"),
                ZonePolicy::default(),
                (0, 1),
                now,
            )
            .unwrap();
        assert_eq!(placement, Placement::Unzoned);
    }
}
