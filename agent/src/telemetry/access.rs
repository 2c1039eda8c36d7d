//! Access logs: one JSON line per connection and per HTTP request, through `tracing` under
//! the target `nodemesh::access` (written to stdout as JSON whatever the format of the other
//! logs; see `logging`). `--access-log-sample-rate` keeps that fraction of lines (1 = all,
//! 0 = none); a line's fields name both ends (workload, namespace, SPIFFE principal), the
//! reporter, the Service, and bytes, status, route and durations where they apply.

use crate::peer::{Reporter, Traffic};
use std::time::Duration;

pub const TARGET: &str = "nodemesh::access";

#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    sample_rate: f64,
}

/// What one HTTP request did.
pub struct RequestRecord<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'static str,
    pub status: u16,
    /// `namespace/name` of the HTTPRoute that matched, if any.
    pub route: &'a str,
    /// The endpoint the request went to, if it went anywhere.
    pub endpoint: Option<std::net::SocketAddr>,
    pub duration: Duration,
    pub trace_id: &'a str,
}

impl AccessLog {
    pub fn new(sample_rate: f64) -> Self {
        Self {
            sample_rate: sample_rate.clamp(0.0, 1.0),
        }
    }

    fn sampled(&self) -> bool {
        self.sample_rate >= 1.0 || (self.sample_rate > 0.0 && fastrand::f64() < self.sample_rate)
    }

    /// A relayed connection ended.
    pub fn connection(
        &self,
        traffic: &Traffic,
        destination: &str,
        sent: u64,
        received: u64,
        duration: Duration,
    ) {
        if !self.sampled() {
            return;
        }
        tracing::info!(
            target: TARGET,
            kind = "connection",
            reporter = reporter(traffic),
            src_workload = %traffic.source.workload,
            src_namespace = %traffic.source.namespace,
            src_principal = %traffic.source.principal,
            dst_workload = %traffic.destination.workload,
            dst_namespace = %traffic.destination.namespace,
            dst_principal = %traffic.destination.principal,
            dst_service = %traffic.destination_service,
            destination,
            mutual_tls = traffic.mutual_tls,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = duration.as_secs_f64() * 1000.0,
        );
    }

    /// An HTTP request was answered.
    pub fn request(&self, traffic: &Traffic, record: &RequestRecord<'_>) {
        if !self.sampled() {
            return;
        }
        tracing::info!(
            target: TARGET,
            kind = "request",
            reporter = reporter(traffic),
            src_workload = %traffic.source.workload,
            src_namespace = %traffic.source.namespace,
            src_principal = %traffic.source.principal,
            dst_workload = %traffic.destination.workload,
            dst_namespace = %traffic.destination.namespace,
            dst_principal = %traffic.destination.principal,
            dst_service = %traffic.destination_service,
            mutual_tls = traffic.mutual_tls,
            method = record.method,
            path = record.path,
            protocol = record.protocol,
            status = record.status,
            route = record.route,
            endpoint = record.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            duration_ms = record.duration.as_secs_f64() * 1000.0,
            trace_id = record.trace_id,
        );
    }
}

fn reporter(traffic: &Traffic) -> &'static str {
    match traffic.reporter {
        Reporter::Source => "source",
        Reporter::Destination => "destination",
    }
}
