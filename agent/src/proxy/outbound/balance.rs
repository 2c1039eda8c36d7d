//! Endpoint choice per request: power of two choices over a peak-EWMA of latency, with
//! outlier ejection.
//!
//! Each endpoint's cost is its latency estimate times (outstanding requests + 1). The
//! estimate jumps up to any slower observation at once (the peak) and decays towards faster
//! ones with a time constant, so a slow endpoint is avoided at once and forgiven gradually.
//! Time with nothing in flight counts as observing nothing (as in tower's and Linkerd's
//! peak EWMA): an endpoint left idle decays towards zero until it is picked and measured
//! again, so one slow answer (a connection's setup, a cold start) does not keep it unused
//! for good while another endpoint is fast enough. While a request is in flight the
//! estimate holds, so an endpoint that stops answering grows dearer with every request
//! sent to it, and an idle endpoint takes one probe at a time, not a burst; a request that
//! ends without an answer (its client left, a timeout fired) counts its wait as a peak.
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
//! the Service's `spill_at` requests in flight. Over that, the port spills until the average
//! is back at `recover_at`: each request's preferred choice competes on cost with the best
//! endpoint beyond (this node's region first), so only requests that would be served
//! faster elsewhere leave. Without a healthy preferred endpoint, requests fail over at once
//! (docs/l7.md, Zones).
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
    sync::{Arc, Mutex, atomic::Ordering},
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
/// The cost of an endpoint with no observation and nothing in flight.
const DEFAULT_COST: f64 = DEFAULT_LATENCY.as_nanos() as f64;

/// The weight an estimate keeps after `elapsed` (the EWMA's decay).
fn weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

#[derive(Debug)]
struct EndpointState {
    latency_ns: f64,
    /// When the estimate last took an observation.
    updated: Instant,
    /// When the last request in flight ended (or the state was made): with `outstanding`
    /// at 0, the estimate decays from then on.
    idle_since: Instant,
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
            idle_since: now,
            outstanding: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    /// The latency estimate at `now`: as last observed while a request is in flight,
    /// decayed towards zero over the time since nothing has been.
    fn latency_at(&self, now: Instant) -> f64 {
        if self.outstanding > 0 {
            return self.latency_ns;
        }
        self.latency_ns * weight(now.saturating_duration_since(self.idle_since))
    }

    /// Takes `observed` (a request's latency, or a lower bound of it) at `now`: at once if
    /// it is slower than the estimate, else averaged in with the weight of the time since
    /// the last observation.
    fn observe(&mut self, observed: f64, now: Instant) {
        let current = self.latency_at(now);
        self.latency_ns = if observed > current {
            observed
        } else {
            let kept = weight(now.saturating_duration_since(self.updated));
            current * kept + observed * (1.0 - kept)
        };
        self.updated = now;
    }

    /// One request less in flight at `now`.
    fn settled(&mut self, now: Instant) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.outstanding == 0 {
            self.idle_since = now;
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        self.latency_at(now) * f64::from(self.outstanding + 1)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Counts a success or failure towards outlier ejection.
    fn record(&mut self, outcome: Outcome, endpoint: SocketAddr, now: Instant) {
        match outcome {
            Outcome::Success => {
                self.consecutive_failures = 0;
                self.ejections = 0;
            }
            Outcome::Failure => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= EJECT_AFTER && !self.ejected(now) {
                    self.ejections += 1;
                    let time = (BASE_EJECTION * self.ejections).min(MAX_EJECTION);
                    self.ejected_until = Some(now + time);
                    self.consecutive_failures = 0;
                    tracing::warn!(%endpoint, ejected_for = ?time, "outlier ejection: {EJECT_AFTER} consecutive failures");
                }
            }
        }
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
        let view = View {
            endpoints: &endpoints,
            now,
            avoid: None,
        };
        let chosen = candidates[two_choices(&view, candidates, draws)?];
        reserve(&mut endpoints, chosen, now);
        Some(chosen)
    }

    /// The choice among a Service port's `candidates`, with two random draws `draws`,
    /// counted as outstanding until `finish`: its index in `candidates.endpoints`, and where
    /// it went. With a preference, the preferred endpoints while they keep up; the others
    /// when none is healthy or, under a `load` policy, for the requests the preferred ones
    /// cannot take. `avoid`: an endpoint this request already failed on (a retry), left out
    /// like an ejected one.
    pub fn pick(
        &self,
        candidates: &Candidates<'_>,
        draws: (u64, u64),
        avoid: Option<SocketAddr>,
    ) -> Option<(usize, Placement)> {
        self.pick_at_time(candidates, draws, avoid, Instant::now())
    }

    fn pick_at_time(
        &self,
        candidates: &Candidates<'_>,
        draws: (u64, u64),
        avoid: Option<SocketAddr>,
        now: Instant,
    ) -> Option<(usize, Placement)> {
        let mut endpoints = self.lock();
        let view = View {
            endpoints: &endpoints,
            now,
            avoid,
        };
        let (index, placement) = choose(&view, candidates, draws)?;
        reserve(&mut endpoints, candidates.endpoints[index], now);
        Some((index, placement))
    }

    /// Takes back a request picked with `pick` that ended without an outcome after
    /// `waited` (the client left, a timeout above it fired): it no longer counts as in
    /// flight, and its answer took at least `waited`, which the estimate takes if it is
    /// slower, but not as a success or failure.
    fn release(&self, endpoint: SocketAddr, waited: Duration) {
        let now = Instant::now();
        if let Some(state) = self.lock().get_mut(&endpoint) {
            if waited.as_nanos() as f64 > state.latency_at(now) {
                state.observe(waited.as_nanos() as f64, now);
            }
            state.settled(now);
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
        state.observe(latency.as_nanos() as f64, now);
        state.settled(now);
        state.record(outcome, endpoint, now);
    }

    /// Records how a connection relayed as TCP to `endpoint` went at connect time: a
    /// failure counts towards ejection as a failed request does; a success ends a run of
    /// failures but not the ejection back-off (an endpoint may accept connections and fail
    /// requests). The latency estimate is the requests', so it is left alone.
    pub fn connected(&self, endpoint: SocketAddr, outcome: Outcome) {
        let now = Instant::now();
        let mut endpoints = self.lock();
        let state = endpoints
            .entry(endpoint)
            .or_insert_with(|| EndpointState::new(now));
        match outcome {
            Outcome::Success => state.consecutive_failures = 0,
            Outcome::Failure => state.record(outcome, endpoint, now),
        }
    }

    /// Whether `endpoint` may be chosen now (not ejected).
    pub fn usable(&self, endpoint: &SocketAddr) -> bool {
        let endpoints = self.lock();
        let view = View {
            endpoints: &endpoints,
            now: Instant::now(),
            avoid: None,
        };
        view.usable(endpoint)
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
                latency_ms: state.latency_at(now) / 1e6,
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

/// A request picked and counted in flight on `endpoint`: `finish` records how it went;
/// dropped unfinished (the request future was dropped: the client left, a timeout above it
/// fired, the request could not be sent), it is taken back so the count does not leak.
pub struct InFlight {
    balancer: Arc<Balancer>,
    endpoint: SocketAddr,
    started: Instant,
    finished: bool,
}

impl InFlight {
    pub fn new(balancer: Arc<Balancer>, endpoint: SocketAddr) -> Self {
        Self {
            balancer,
            endpoint,
            started: Instant::now(),
            finished: false,
        }
    }

    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        let latency = self.started.elapsed();
        self.balancer.finish(self.endpoint, latency, outcome);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.balancer.release(self.endpoint, self.started.elapsed());
        }
    }
}

/// The endpoints' state as one pick sees it: at `now`, with `avoid` (the endpoint the
/// request's previous attempt failed on) unusable like an ejected one.
struct View<'a> {
    endpoints: &'a HashMap<SocketAddr, EndpointState>,
    now: Instant,
    avoid: Option<SocketAddr>,
}

impl View<'_> {
    fn usable(&self, endpoint: &SocketAddr) -> bool {
        self.avoid != Some(*endpoint)
            && !self
                .endpoints
                .get(endpoint)
                .is_some_and(|e| e.ejected(self.now))
    }

    fn cost(&self, endpoint: &SocketAddr) -> f64 {
        self.endpoints
            .get(endpoint)
            .map_or(DEFAULT_COST, |state| state.cost(self.now))
    }

    fn outstanding(&self, endpoint: &SocketAddr) -> u32 {
        self.endpoints.get(endpoint).map_or(0, |e| e.outstanding)
    }
}

/// The pick itself (see `Balancer::pick`): the index in `candidates.endpoints` and where it
/// went.
fn choose(
    view: &View<'_>,
    candidates: &Candidates<'_>,
    draws: (u64, u64),
) -> Option<(usize, Placement)> {
    let all = candidates.endpoints;
    let Some(preference) = candidates.preference else {
        return Some((two_choices(view, all, draws)?, Placement::Unzoned));
    };
    let [local, region, beyond] = preference.tiers(all.len()).map(|tier| &all[tier]);
    let remote = &all[local.len()..];
    if remote.is_empty() {
        // Nowhere to spill to: the plain choice, ejection and panic mode included.
        candidates.spilling.store(false, Ordering::Relaxed);
        return Some((two_choices(view, all, draws)?, Placement::Local));
    }
    // The endpoint beyond the preferred ones a spilled request goes to (other draws than
    // the preferred choice's).
    let target = || {
        let swapped = (draws.1, draws.0);
        let spill_at = candidates.policy.spill_at;
        spill_target(view, (region, beyond), spill_at, swapped).map(|index| local.len() + index)
    };
    let usable_local = local.iter().filter(|e| view.usable(e)).count();
    if usable_local == 0 {
        return Some((target()?, Placement::Spilled(SpillReason::Unavailable)));
    }
    let load = (local.iter().filter(|e| view.usable(e)))
        .map(|e| view.outstanding(e) as f32)
        .sum::<f32>()
        / usable_local as f32;
    let spilling =
        candidates.policy.affinity == ZoneAffinity::Load && spill_state(candidates, load);
    let index = two_choices(view, local, draws)?;
    if !spilling {
        return Some((index, Placement::Local));
    }
    // Spilling: the preferred choice against the best beyond it, on cost (latency × (in
    // flight + 1)), so a request leaves only when that is faster.
    match target() {
        Some(other)
            if view.usable(&all[other]) && view.cost(&all[other]) < view.cost(&local[index]) =>
        {
            Some((other, Placement::Spilled(SpillReason::Overloaded)))
        }
        _ => Some((index, Placement::Local)),
    }
}

/// Whether the port spills at the preferred endpoints' average `load` (moving its state
/// across the policy's thresholds).
fn spill_state(candidates: &Candidates<'_>, load: f32) -> bool {
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

/// Power of two choices over `candidates` (its index), unusable ones (ejected, avoided) left
/// out unless every one is (panic mode).
fn two_choices(view: &View<'_>, candidates: &[SocketAddr], draws: (u64, u64)) -> Option<usize> {
    let live = candidates.iter().filter(|a| view.usable(a)).count();
    let panic = live == 0;
    let n = if panic { candidates.len() } else { live };
    // The `i`th candidate of the pool (the usable ones, or all in panic mode).
    let nth = |i: usize| -> Option<usize> {
        match panic {
            true => Some(i),
            false => (candidates.iter().enumerate())
                .filter(|(_, a)| view.usable(a))
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
            let cost = |index: usize| view.cost(&candidates[index]);
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
/// usable endpoint.
fn spill_target(
    view: &View<'_>,
    (region, beyond): (&[SocketAddr], &[SocketAddr]),
    spill_at: f32,
    draws: (u64, u64),
) -> Option<usize> {
    if beyond.is_empty() {
        return two_choices(view, region, draws);
    }
    if region.iter().any(|e| view.usable(e)) {
        let index = two_choices(view, region, draws)?;
        if (view.outstanding(&region[index]) as f32) < spill_at {
            return Some(index);
        }
    }
    Some(region.len() + two_choices(view, beyond, draws)?)
}

/// Counts a request as outstanding on `endpoint`.
fn reserve(endpoints: &mut HashMap<SocketAddr, EndpointState>, endpoint: SocketAddr, now: Instant) {
    endpoints
        .entry(endpoint)
        .or_insert_with(|| EndpointState::new(now))
        .outstanding += 1;
}

#[cfg(test)]
mod tests;
