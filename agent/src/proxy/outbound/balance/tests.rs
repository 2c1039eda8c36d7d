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

/// A balancer that has seen one successful request to each endpoint, taking the
/// milliseconds given, at `now`.
fn measured(endpoints: &[(SocketAddr, u64)], now: Instant) -> Balancer {
    let balancer = Balancer::default();
    for &(addr, ms) in endpoints {
        balancer.pick_at(&[addr], (0, 0), now);
        balancer.finish_at(addr, Duration::from_millis(ms), Outcome::Success, now);
    }
    balancer
}

#[test]
fn the_faster_of_two_wins_and_draws_are_distinct() {
    let [a, b, c] = addrs();
    let now = Instant::now();
    let balancer = measured(&[(a, 50), (b, 2), (c, 10)], now);
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
    let peak = balancer.views()[0].latency_ms;
    assert!((peak - 100.0).abs() < 0.01, "{peak}");
    balancer.pick_at(&[a], (0, 0), now);
    balancer.finish_at(a, Duration::from_millis(1), Outcome::Success, now + DECAY);
    let after = balancer.views()[0].latency_ms;
    // One time constant: 100·e^-1 + 1·(1 − e^-1) ≈ 37.4 ms.
    assert!((after - 37.4).abs() < 0.1, "{after}");
}

#[test]
fn an_endpoint_left_unpicked_decays_until_it_is_measured_again() {
    let [a, b, _] = addrs();
    let now = Instant::now();
    // b's first answer was slow (its connection's setup), a is steadily 5 ms.
    let balancer = measured(&[(a, 5), (b, 50)], now);
    let mut at = now;
    for _ in 0..20 {
        assert_eq!(balancer.pick_at(&[a, b], (0, 0), at), Some(a), "{at:?}");
        balancer.finish_at(a, Duration::from_millis(5), Outcome::Success, at);
        at += Duration::from_secs(1);
    }
    // 30 s on, b's estimate has decayed to 50·e^-3 ≈ 2.5 ms, under a's 5: b is tried again,
    // and its fast answer is what it is judged by from then on.
    let later = now + DECAY * 3;
    balancer.finish_at(a, Duration::from_millis(5), Outcome::Success, later);
    assert_eq!(balancer.pick_at(&[a, b], (0, 0), later), Some(b));
    balancer.finish_at(b, Duration::from_millis(1), Outcome::Success, later);
    assert_eq!(balancer.pick_at(&[a, b], (0, 0), later), Some(b));
}

#[test]
fn an_endpoint_with_requests_in_flight_does_not_decay_and_a_probe_is_one_at_a_time() {
    let [a, b, _] = addrs();
    let now = Instant::now();
    let balancer = measured(&[(a, 5), (b, 50)], now);
    // b has one request in flight that does not answer: a minute on, its estimate still
    // holds (50 ms × 2 in flight), so a takes the requests.
    balancer.pick_at(&[b], (0, 0), now);
    let later = now + DECAY * 6;
    balancer.finish_at(a, Duration::from_millis(5), Outcome::Success, later);
    assert_eq!(balancer.pick_at(&[a, b], (0, 0), later), Some(a));
    // Once it ends without an answer, its minute of waiting is the new peak.
    balancer.release(b, DECAY * 6);
    let peak = balancer
        .views()
        .iter()
        .find(|v| v.endpoint == b)
        .unwrap()
        .latency_ms;
    assert!(peak > 59_000.0, "{peak}");
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
fn a_zone_keeps_its_requests_until_it_is_overloaded_then_spills_what_is_faster_elsewhere() {
    let balancer = Balancer::default();
    let endpoints = one_local_ten_remote();
    let spilling = AtomicBool::new(false);
    let zoned = candidates(&endpoints, Some(1), ZonePolicy::default(), &spilling);
    let now = Instant::now();
    let pick = |draw: u64| {
        let (index, placement) = balancer
            .pick_at_time(&zoned, (draw, draw + 3), None, now)
            .unwrap();
        (endpoints[index], placement)
    };
    // Light load: the one local endpoint takes every request although ten remote ones
    // are idle (plain two choices would send it about 1 in 6), up to `spill_at` (4).
    for draw in 0..4 {
        assert_eq!(pick(draw), (endpoints[0], Placement::Local));
    }
    // At 4 in flight the port spills: the local endpoint (1 ms × 5) loses to idle
    // remote ones (1 ms × 1) until they carry as much.
    for draw in 4..8 {
        let (endpoint, placement) = pick(draw);
        assert_eq!(placement, Placement::Spilled(SpillReason::Overloaded));
        assert_ne!(endpoint, endpoints[0]);
    }
    assert!(spilling.load(Ordering::Relaxed));
    // Hysteresis: the port spills until the zone is down to `recover_at` (2) ...
    let done = || {
        balancer.finish_at(
            endpoints[0],
            Duration::from_millis(1),
            Outcome::Success,
            now,
        )
    };
    done();
    assert!(matches!(pick(20).1, Placement::Spilled(_)));
    assert!(spilling.load(Ordering::Relaxed));
    // ... and then takes every request again.
    for _ in 0..3 {
        done();
    }
    assert_eq!(pick(30), (endpoints[0], Placement::Local));
    assert!(!spilling.load(Ordering::Relaxed));
}

#[test]
fn a_faster_zone_keeps_requests_while_spilling_until_its_queue_makes_it_dearer() {
    let balancer = Balancer::default();
    let endpoints = one_local_ten_remote();
    let spilling = AtomicBool::new(true);
    let zoned = candidates(&endpoints, Some(1), ZonePolicy::default(), &spilling);
    // The local endpoint measured at 0.1 ms (a minute of decay towards it), the remote
    // ones not yet (1 ms).
    let start = Instant::now();
    balancer.pick_at(&[endpoints[0]], (0, 0), start);
    let later = start + Duration::from_secs(60);
    let fast = Duration::from_micros(100);
    balancer.finish_at(endpoints[0], fast, Outcome::Success, later);
    // Its estimate, 0.102 ms, × (in flight + 1) stays under 1 ms up to 8 in flight.
    let placements: Vec<Placement> = (0..10)
        .map(|draw| {
            balancer
                .pick_at_time(&zoned, (draw, 1), None, later)
                .unwrap()
                .1
        })
        .collect();
    assert!(
        placements[..9].iter().all(|p| *p == Placement::Local),
        "{placements:?}"
    );
    assert_eq!(placements[9], Placement::Spilled(SpillReason::Overloaded));
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
        .map(|draw| {
            balancer
                .pick_at_time(&zoned, (draw, 1), None, now)
                .unwrap()
                .1
        })
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
            balancer.pick_at_time(&zoned, (draw, 1), None, now),
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
    let (index, placement) = balancer.pick_at_time(&zoned, (0, 1), None, now).unwrap();
    assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
    assert_ne!(index, 0);
    // No endpoint in the zone at all: the same.
    let none_here = candidates(&endpoints, Some(0), ZonePolicy::default(), &spilling);
    let (_, placement) = balancer
        .pick_at_time(&none_here, (0, 1), None, now)
        .unwrap();
    assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
    // No preference (a node without a zone label, endpoints without zones, policy off):
    // the plain choice.
    let unzoned = candidates(&endpoints, None, ZonePolicy::default(), &spilling);
    let (_, placement) = balancer.pick_at_time(&unzoned, (0, 1), None, now).unwrap();
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
        let (index, placement) = balancer.pick_at_time(&tiers, (draw, 1), None, now).unwrap();
        assert_eq!(placement, Placement::Spilled(SpillReason::Unavailable));
        if index < 3 {
            in_region += 1;
        }
    }
    // The region's three endpoints take requests until each has 4 in flight.
    assert_eq!(in_region, 12, "light enough for the region");
    for draw in 12..40 {
        balancer.pick_at_time(&tiers, (draw, 1), None, now).unwrap();
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
