//! What the scenarios record and how the report summarises it: samples with their median
//! and spread, the keep-alive HTTP/1.1 paths and their runs, CA issuance, h2load runs.

use anyhow::Context;
use serde_json::Value;

pub(super) struct Samples(pub(super) Vec<f64>);

/// A path of the keep-alive HTTP/1.1 scenarios (and of bulk, which has the first three).
#[derive(Clone, Copy, Debug)]
pub(super) enum HttpPath {
    Direct,
    PlainL4,
    MtlsL4,
    L7,
}

impl HttpPath {
    pub(super) fn description(self) -> &'static str {
        match self {
            Self::Direct => "direct (non-meshed pods)",
            Self::PlainL4 => {
                "meshed pod to non-meshed pod: the source's proxy only, plain TCP (L4, no mTLS)"
            }
            Self::MtlsL4 => "meshed pod to meshed pod: both node proxies, HBONE mTLS (L4)",
            Self::L7 => {
                "meshed pod to a Service with an HTTPRoute: L7 proxy (parse, route, balance) + HBONE mTLS"
            }
        }
    }

    pub(super) fn short(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::PlainL4 => "L4, no mTLS",
            Self::MtlsL4 => "L4, HBONE mTLS",
            Self::L7 => "L7, HTTPRoute + HBONE mTLS",
        }
    }
}

/// The closed-loop runs of one path.
#[derive(Default)]
pub(super) struct HttpRuns {
    pub(super) p50: Vec<f64>,
    pub(super) p99: Vec<f64>,
    pub(super) p999: Vec<f64>,
    pub(super) rps: Vec<f64>,
    pub(super) cpu_per_10k: Vec<f64>,
    /// The last run's latency distribution: (quantile, µs).
    pub(super) last_cdf: Vec<(f64, f64)>,
}

impl HttpRuns {
    pub(super) fn record(&mut self, out: &Value, cpu_per_10k: f64) -> anyhow::Result<()> {
        let field = |name: &str| out[name].as_f64().with_context(|| name.to_owned());
        self.p50.push(field("p50_us")?);
        self.p99.push(field("p99_us")?);
        self.p999.push(field("p999_us")?);
        self.rps.push(field("rps")?);
        self.cpu_per_10k.push(cpu_per_10k);
        self.last_cdf = out["cdf_us"]
            .as_array()
            .context("cdf_us")?
            .iter()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect();
        Ok(())
    }

    pub(super) fn summary(&self) -> HttpSummary {
        HttpSummary {
            p50: Samples(self.p50.clone()),
            p99: Samples(self.p99.clone()),
            p999: Samples(self.p999.clone()),
            rps: Samples(self.rps.clone()),
            cpu: Samples(self.cpu_per_10k.clone()),
        }
    }
}

pub(super) struct HttpSummary {
    pub(super) p50: Samples,
    pub(super) p99: Samples,
    pub(super) p999: Samples,
    pub(super) rps: Samples,
    pub(super) cpu: Samples,
}

/// CA issuance samples at one level of requests in flight.
pub(super) struct Issuance {
    pub(super) concurrency: usize,
    pub(super) rates: Vec<f64>,
    pub(super) p50_ms: Vec<f64>,
    pub(super) p99_ms: Vec<f64>,
}

impl Samples {
    pub(super) fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
    /// "median (min–max)" with `decimals` decimals.
    pub(super) fn cell(&self, decimals: usize) -> String {
        format!("{:.*} ({})", decimals, self.median(), self.spread())
    }

    pub(super) fn spread(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.1}–{max:.1}")
    }
}

/// One h2load run: requests/s and per-request latency percentiles (µs).
pub(super) struct H2Run {
    pub(super) rps: f64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
}

pub(super) struct H2Samples {
    pub(super) rps: Samples,
    pub(super) p50: Samples,
    pub(super) p99: Samples,
}

impl H2Samples {
    pub(super) fn of(runs: &[H2Run]) -> Self {
        Self {
            rps: Samples(runs.iter().map(|r| r.rps).collect()),
            p50: Samples(runs.iter().map(|r| r.p50_us).collect()),
            p99: Samples(runs.iter().map(|r| r.p99_us).collect()),
        }
    }
}
