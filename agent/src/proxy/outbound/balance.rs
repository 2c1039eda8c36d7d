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
//! With a zone preference (the Service index puts the endpoints this node prefers first),
//! the two choices are made among the preferred endpoints while they average fewer than
//! the Service's `spill_at` requests in flight; over that, only what they cannot take goes
//! to the others, until the average is back at `recover_at`; without a healthy preferred
//! endpoint, requests fail over at once (docs/l7.md, Zones).
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
    sync::{Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::{k8s::zone_policy::ZoneAffinity, state::services::Candidates};

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

/// Where a pick went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// No preference (no zones, or the Service's policy is off): the plain choice over
    /// every endpoint.
    Unzoned,
    /// A preferred endpoint (in the client's zone, or hinted to it).
    Local,
    /// Another one, and why.
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

impl SpillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Overloaded => "overloaded",
        }
    }
}

impl Balancer {
    /// The plain choice among `candidates` (two random draws `draws`), counted as
    /// outstanding until `finish`: what `pick` does without a zone preference.
    #[cfg(test)]
    fn pick_at(
        &self,
        candidates: &[SocketAddr],
        draws: (u64, u64),
        now: Instant,
    ) -> Option<SocketAddr> {
        let mut endpoints = self.lock();
        let chosen = candidates[two_choices(&endpoints, candidates, draws, now)?];
        reserve(&mut endpoints, chosen, now);
        Some(chosen)
    }

    /// The choice among a Service port's `candidates`, with two random draws `draws`,
    /// counted as outstanding until `finish`: its index in `candidates.endpoints`, and where
    /// it went. With a preference, the preferred endpoints while they keep up; the others
    /// when none is healthy or, under a `load` policy, for the requests the preferred ones
    /// cannot take.
    pub fn pick(
        &self,
        candidates: &Candidates<'_>,
        draws: (u64, u64),
    ) -> Option<(usize, Placement)> {
        self.pick_at_time(candidates, draws, Instant::now())
    }

    fn pick_at_time(
        &self,
        candidates: &Candidates<'_>,
        draws: (u64, u64),
        now: Instant,
    ) -> Option<(usize, Placement)> {
        let mut endpoints = self.lock();
        let all = candidates.endpoints;
        let chosen = |endpoints: &mut HashMap<SocketAddr, EndpointState>, index: usize| {
            reserve(endpoints, all[index], now);
            index
        };
        let Some(preference) = candidates.preference else {
            let index = two_choices(&endpoints, all, draws, now)?;
            return Some((chosen(&mut endpoints, index), Placement::Unzoned));
        };
        let (local, remote) = all.split_at((preference.count as usize).min(all.len()));
        if remote.is_empty() {
            // Nowhere to spill to: the plain choice, ejection and panic mode included.
            let index = two_choices(&endpoints, all, draws, now)?;
            return Some((chosen(&mut endpoints, index), Placement::Local));
        }
        let healthy = |e: &&SocketAddr| !endpoints.get(*e).is_some_and(|s| s.ejected(now));
        let healthy_local = local.iter().filter(healthy).count();
        let reason = if healthy_local == 0 {
            SpillReason::Unavailable
        } else {
            let outstanding = |e: &SocketAddr| endpoints.get(e).map_or(0, |s| s.outstanding);
            let load = (local.iter().filter(healthy))
                .map(|e| outstanding(e) as f32)
                .sum::<f32>()
                / healthy_local as f32;
            let spilling = candidates.policy.affinity == ZoneAffinity::Load
                && self.spill_state(candidates, load);
            let index = two_choices(&endpoints, local, draws, now)?;
            if !spilling || (outstanding(&local[index]) as f32) < candidates.policy.spill_at {
                return Some((chosen(&mut endpoints, index), Placement::Local));
            }
            SpillReason::Overloaded
        };
        let (region, beyond) = remote.split_at((preference.region as usize).min(remote.len()));
        let spill_at = candidates.policy.spill_at;
        let index = local.len() + spill_target(&endpoints, (region, beyond), spill_at, draws, now)?;
        Some((chosen(&mut endpoints, index), Placement::Spilled(reason)))
    }

    /// Whether the port spills at the preferred endpoints' average `load` (moving its state
    /// across the policy's thresholds).
    fn spill_state(&self, candidates: &Candidates<'_>, load: f32) -> bool {
        let policy = candidates.policy;
        let service = format_args!("{}:{}", candidates.service, candidates.port);
        match candidates.spilling.load(Ordering::Relaxed) {
            true if load <= policy.recover_at => {
                candidates.spilling.store(false, Ordering::Relaxed);
                tracing::info!(%service, load, "back to the preferred endpoints");
                false
            }
            true => true,
            false if load >= policy.spill_at => {
                candidates.spilling.store(true, Ordering::Relaxed);
                tracing::info!(%service, load, "spilling beyond the preferred endpoints");
                true
            }
            false => false,
        }
    }

    /// Records the end of a request picked with `pick`.
    pub fn finish(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome) {
        self.finish_at(endpoint, latency, outcome, Instant::now());
    }

    fn finish_at(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome, now: Instant) {
        let mut guard = self.lock();
        let state = guard
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

/// Power of two choices over `candidates` (its index), ejected ones left out unless every
/// one is (panic mode).
fn two_choices(
    endpoints: &HashMap<SocketAddr, EndpointState>,
    candidates: &[SocketAddr],
    draws: (u64, u64),
    now: Instant,
) -> Option<usize> {
    let healthy = |addr: &SocketAddr| !endpoints.get(addr).is_some_and(|e| e.ejected(now));
    let live = candidates.iter().filter(|a| healthy(a)).count();
    let panic = live == 0;
    let n = if panic { candidates.len() } else { live };
    // The `i`th candidate of the pool (the healthy ones, or all in panic mode).
    let nth = |i: usize| -> Option<usize> {
        match panic {
            true => Some(i),
            false => (candidates.iter().enumerate())
                .filter(|(_, a)| healthy(a))
                .nth(i)
                .map(|(index, _)| index),
        }
    };
    match n {
        0 => None,
        1 => nth(0),
        n => {
            let first = nth((draws.0 % n as u64) as usize)?;
            // A second, distinct one.
            let second =
                nth(((draws.0 % n as u64) as usize + 1 + (draws.1 % (n as u64 - 1)) as usize) % n)?;
            let cost = |index: usize| {
                endpoints
                    .get(&candidates[index])
                    .map_or(DEFAULT_LATENCY.as_nanos() as f64, EndpointState::cost)
            };
            Some(if cost(second) < cost(first) {
                second
            } else {
                first
            })
        }
    }
}

/// Where a request that leaves its preferred endpoints goes (its index in `region` then
/// `beyond`): an endpoint of this node's region, by two choices, while the one chosen has
/// fewer than `spill_at` in flight; the other regions' otherwise, or when this region has no
/// healthy endpoint.
fn spill_target(
    endpoints: &HashMap<SocketAddr, EndpointState>,
    (region, beyond): (&[SocketAddr], &[SocketAddr]),
    spill_at: f32,
    draws: (u64, u64),
    now: Instant,
) -> Option<usize> {
    if beyond.is_empty() {
        return two_choices(endpoints, region, draws, now);
    }
    let healthy = |e: &SocketAddr| !endpoints.get(e).is_some_and(|s| s.ejected(now));
    if region.iter().any(healthy) {
        let index = two_choices(endpoints, region, draws, now)?;
        let outstanding = endpoints.get(&region[index]).map_or(0, |s| s.outstanding);
        if (outstanding as f32) < spill_at {
            return Some(index);
        }
    }
    Some(region.len() + two_choices(endpoints, beyond, draws, now)?)
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
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::{
        k8s::zone_policy::ZonePolicy,
        state::services::{Preference, PreferredBy},
    };

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

    /// One preferred endpoint (in the client's zone), ten others.
    fn one_local_ten_remote() -> Vec<SocketAddr> {
        (1..=11)
            .map(|i| format!("10.0.1.{i}:80").parse().unwrap())
            .collect()
    }

    fn candidates<'a>(
        endpoints: &'a [SocketAddr],
        preferred: Option<u32>,
        policy: ZonePolicy,
        spilling: &'a AtomicBool,
    ) -> Candidates<'a> {
        Candidates {
            service: "shop/web",
            port: 80,
            endpoints,
            zones: &[],
            preference: preferred.map(|count| Preference {
                by: PreferredBy::Zone,
                count,
                region: 0,
            }),
            policy,
            spilling,
        }
    }

    #[test]
    fn a_zone_keeps_its_requests_until_it_is_overloaded_then_spills_the_excess_with_hysteresis() {
        let balancer = Balancer::default();
        let endpoints = one_local_ten_remote();
        let spilling = AtomicBool::new(false);
        let zoned = candidates(&endpoints, Some(1), ZonePolicy::default(), &spilling);
        let now = Instant::now();
        let pick = |draw: u64| {
            let (index, placement) = balancer
                .pick_at_time(&zoned, (draw, draw + 3), now)
                .unwrap();
            (endpoints[index], placement)
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
        assert!(spilling.load(Ordering::Relaxed));
        // Hysteresis: at 3 in flight locally it still spills what would exceed 4 ...
        let done = || {
            balancer.finish_at(
                endpoints[0],
                Duration::from_millis(1),
                Outcome::Success,
                now,
            )
        };
        done();
        assert_eq!(pick(20), (endpoints[0], Placement::Local));
        let (_, placement) = pick(21);
        assert_eq!(placement, Placement::Spilled(SpillReason::Overloaded));
        // ... and returns only once the zone is down to `recover_at` (2).
        done();
        done();
        assert_eq!(pick(30), (endpoints[0], Placement::Local));
        assert!(!spilling.load(Ordering::Relaxed));
    }

    #[test]
    fn per_service_thresholds_and_a_strict_affinity() {
        let endpoints = one_local_ten_remote();
        let now = Instant::now();
        // spill-at 2: the second request in flight already spills the excess.
        let balancer = Balancer::default();
        let spilling = AtomicBool::new(false);
        let low = ZonePolicy {
            spill_at: 2.0,
            recover_at: 1.0,
            ..ZonePolicy::default()
        };
        let zoned = candidates(&endpoints, Some(1), low, &spilling);
        let placements: Vec<Placement> = (0..4)
            .map(|draw| balancer.pick_at_time(&zoned, (draw, 1), now).unwrap().1)
            .collect();
        assert_eq!(
            placements,
            [
                Placement::Local,
                Placement::Local,
                Placement::Spilled(SpillReason::Overloaded),
                Placement::Spilled(SpillReason::Overloaded)
            ]
        );
        // Strict: however loaded, the zone keeps every request while it has a healthy
        // endpoint.
        let balancer = Balancer::default();
        let strict = ZonePolicy {
            affinity: ZoneAffinity::Strict,
            ..ZonePolicy::default()
        };
        let zoned = candidates(&endpoints, Some(1), strict, &spilling);
        for draw in 0..50 {
            assert_eq!(
                balancer.pick_at_time(&zoned, (draw, 1), now),
                Some((0, Placement::Local))
            );
        }
    }

    #[test]
    fn a_zone_without_a_healthy_endpoint_fails_over_and_unzoned_clients_are_unaffected() {
        let balancer = Balancer::default();
        let endpoints = one_local_ten_remote();
        let spilling = AtomicBool::new(false);
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
        let zoned = candidates(&endpoints, Some(1), ZonePolicy::default(), &spilling);
        let (index, placement) = balancer.pick_at_time(&zoned, (0, 1), now).unwrap();
        assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
        assert_ne!(index, 0);
        // No endpoint in the zone at all: the same.
        let none_here = candidates(&endpoints, Some(0), ZonePolicy::default(), &spilling);
        let (_, placement) = balancer.pick_at_time(&none_here, (0, 1), now).unwrap();
        assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
        // No preference (a node without a zone label, endpoints without zones, policy off):
        // the plain choice.
        let unzoned = candidates(&endpoints, None, ZonePolicy::default(), &spilling);
        let (_, placement) = balancer.pick_at_time(&unzoned, (0, 1), now).unwrap();
        assert_eq!(placement, Placement::Unzoned);
    }

    #[test]
    fn spilled_requests_stay_in_the_region_until_it_is_loaded_too() {
        let balancer = Balancer::default();
        // One endpoint in the client's zone (none healthy: it is never listed), three in
        // other zones of its region, seven in other regions.
        let endpoints = &one_local_ten_remote()[1..];
        let spilling = AtomicBool::new(false);
        let mut tiers = candidates(endpoints, Some(0), ZonePolicy::default(), &spilling);
        tiers.preference = Some(Preference {
            by: PreferredBy::Zone,
            count: 0,
            region: 3,
        });
        let now = Instant::now();
        let mut in_region = 0;
        for draw in 0..12 {
            let (index, placement) = balancer.pick_at_time(&tiers, (draw, 1), now).unwrap();
            assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
            if index < 3 {
                in_region += 1;
            }
        }
        // The region's three endpoints take requests until each has 4 in flight.
        assert_eq!(in_region, 12, "light enough for the region");
        for draw in 12..40 {
            balancer.pick_at_time(&tiers, (draw, 1), now).unwrap();
        }
        let views = balancer.views();
        let load = |e: &SocketAddr| {
            views
                .iter()
                .find(|v| v.endpoint == *e)
                .map_or(0, |v| v.outstanding)
        };
        assert!(endpoints[..3].iter().all(|e| load(e) == 4), "{views:?}");
        assert_eq!(endpoints[3..].iter().map(load).sum::<u32>(), 40 - 12);
    }
}
