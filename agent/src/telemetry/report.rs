//! One relayed connection's telemetry: counted as opened when relaying starts, then counted
//! as closed with its bytes and written to the access log when it ends. Every place that
//! relays opaque TCP (outbound, HBONE delivery, plaintext delivery, authorization's
//! non-HTTP streams) reports through it.

use std::time::Instant;

use super::{access::AccessLog, metrics::Metrics};
use crate::peer::Traffic;

pub struct ConnectionReport<'a> {
    metrics: &'a Metrics,
    access_log: AccessLog,
    traffic: &'a Traffic,
    /// Where the connection went, for the access log.
    destination: String,
    started: Instant,
}

impl<'a> ConnectionReport<'a> {
    pub fn open(
        metrics: &'a Metrics,
        access_log: AccessLog,
        traffic: &'a Traffic,
        destination: impl ToString,
    ) -> Self {
        metrics.tcp_opened(traffic);
        Self {
            metrics,
            access_log,
            traffic,
            destination: destination.to_string(),
            started: Instant::now(),
        }
    }

    /// The connection ended having carried `sent` bytes from the source, `received` back.
    pub fn close(self, sent: u64, received: u64) {
        self.metrics.tcp_closed(self.traffic, sent, received);
        self.access_log.connection(
            self.traffic,
            &self.destination,
            sent,
            received,
            self.started.elapsed(),
        );
    }
}
