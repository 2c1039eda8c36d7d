//! Connection and byte counters per (source pod, original destination).
//!
//! Cardinality is bounded: past `MAX_SERIES` distinct pairs, new pairs are counted under the
//! destination `other`, so a pod scanning many addresses cannot grow the agent's memory.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;

const MAX_SERIES: usize = 10_000;
const OVERFLOW_DESTINATION: &str = "other";

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ConnectionCounters {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnectionSeries {
    pub source_pod: String,
    pub destination: String,
    #[serde(flatten)]
    pub counters: ConnectionCounters,
}

/// Plaintext connections that reached meshed pods from outside the mesh.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PlaintextCounters {
    /// Delivered (PERMISSIVE namespaces, or from the node's own addresses).
    pub permitted: u64,
    /// Reset because the namespace is STRICT.
    pub refused: u64,
}

/// What protocol detection concluded for one connection to a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectionOutcome {
    Http1,
    Http2,
    Tls,
    Opaque,
    TimedOut,
    Skipped,
}

impl DetectionOutcome {
    /// The name in `/stats` and in `nodemesh_protocol_detection_total{outcome}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Tls => "tls",
            Self::Opaque => "opaque",
            Self::TimedOut => "timed_out",
            Self::Skipped => "skipped",
        }
    }
}

/// Outcomes of protocol detection on connections to Service ports.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DetectionCounters {
    pub http1: u64,
    pub http2: u64,
    pub tls: u64,
    /// Bytes arrived and were not HTTP or TLS.
    pub opaque: u64,
    /// Nothing conclusive arrived within the wait (server-speaks-first protocols).
    pub timed_out: u64,
    /// The Service port's appProtocol says it is not HTTP: no detection.
    pub skipped: u64,
}

#[derive(Default)]
pub struct ConnectionStats {
    series: Mutex<BTreeMap<(String, String), ConnectionCounters>>,
    detection: Mutex<DetectionCounters>,
    plaintext_permitted: AtomicU64,
    plaintext_refused: AtomicU64,
}

impl ConnectionStats {
    pub fn plaintext_permitted(&self) {
        self.plaintext_permitted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn plaintext_refused(&self) {
        self.plaintext_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn plaintext(&self) -> PlaintextCounters {
        PlaintextCounters {
            permitted: self.plaintext_permitted.load(Ordering::Relaxed),
            refused: self.plaintext_refused.load(Ordering::Relaxed),
        }
    }

    pub fn detected(&self, outcome: DetectionOutcome) {
        let mut counters = self.detection.lock().unwrap_or_else(|p| p.into_inner());
        let counter = match outcome {
            DetectionOutcome::Http1 => &mut counters.http1,
            DetectionOutcome::Http2 => &mut counters.http2,
            DetectionOutcome::Tls => &mut counters.tls,
            DetectionOutcome::Opaque => &mut counters.opaque,
            DetectionOutcome::TimedOut => &mut counters.timed_out,
            DetectionOutcome::Skipped => &mut counters.skipped,
        };
        *counter += 1;
    }

    pub fn detection(&self) -> DetectionCounters {
        self.detection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn opened(&self, source_pod: &str, destination: SocketAddr) {
        self.update(source_pod, destination, |c| c.opened += 1);
    }

    /// A connection finished; bytes are as seen from the source pod (sent = towards the
    /// destination).
    pub fn closed(
        &self,
        source_pod: &str,
        destination: SocketAddr,
        bytes_sent: u64,
        bytes_received: u64,
    ) {
        self.update(source_pod, destination, |c| {
            c.closed += 1;
            c.bytes_sent += bytes_sent;
            c.bytes_received += bytes_received;
        });
    }

    /// The proxy could not reach the destination.
    pub fn failed(&self, source_pod: &str, destination: SocketAddr) {
        self.update(source_pod, destination, |c| {
            c.failed += 1;
            c.closed += 1;
        });
    }

    pub fn snapshot(&self) -> Vec<ConnectionSeries> {
        self.lock()
            .iter()
            .map(|((source_pod, destination), counters)| ConnectionSeries {
                source_pod: source_pod.clone(),
                destination: destination.clone(),
                counters: counters.clone(),
            })
            .collect()
    }

    fn update(
        &self,
        source_pod: &str,
        destination: SocketAddr,
        apply: impl FnOnce(&mut ConnectionCounters),
    ) {
        let mut series = self.lock();
        let mut key = (source_pod.to_owned(), destination.to_string());
        if !series.contains_key(&key) && series.len() >= MAX_SERIES {
            key.1 = OVERFLOW_DESTINATION.to_owned();
        }
        apply(series.entry(key).or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), ConnectionCounters>> {
        self.series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_pair_and_bounds_cardinality() {
        let stats = ConnectionStats::default();
        let dest: SocketAddr = "198.18.2.10:80".parse().unwrap();
        stats.opened("mesh/a", dest);
        stats.closed("mesh/a", dest, 10, 20);
        let snap = stats.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(
            snap[0].counters,
            ConnectionCounters {
                opened: 1,
                closed: 1,
                failed: 0,
                bytes_sent: 10,
                bytes_received: 20
            }
        );

        for port in 0..(MAX_SERIES as u16 + 5) {
            stats.opened("mesh/scanner", SocketAddr::from(([198, 18, 2, 10], port)));
        }
        let snap = stats.snapshot();
        assert_eq!(snap.len(), MAX_SERIES + 1);
        let other = snap
            .iter()
            .find(|s| s.destination == OVERFLOW_DESTINATION)
            .unwrap();
        assert_eq!(other.counters.opened, 6);
    }
}
