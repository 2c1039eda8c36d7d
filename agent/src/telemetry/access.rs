//! Access logs: one JSON line per connection and per HTTP request on stdout (`access_output`
//! batches them). `--access-log-sample-rate` keeps that fraction of lines (1 = all, 0 =
//! none); a line's fields name both ends (workload, namespace, SPIFFE principal), the
//! reporter, the Service, and bytes, status, route and durations where they apply.
//!
//! Lines are encoded here with serde_json into a buffer per thread, in the shape the
//! `tracing` JSON layer gave them (`timestamp`, `level`, the fields, `target`). They went
//! through that layer before: its dispatch, filters and field visitors were most of what a
//! line cost, 8 % of the agent's CPU on short-lived connections (docs/benchmarks.md).

use std::{cell::RefCell, fmt, net::SocketAddr, time::Duration};

use serde::{Serialize, Serializer};
use tracing_subscriber::fmt::{format::Writer, time::FormatTime};

use super::access_output;
use crate::peer::{Reporter, Traffic};

/// The `target` every line names, as when they were `tracing` events.
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
    pub endpoint: Option<SocketAddr>,
    pub duration: Duration,
    pub trace_id: &'a str,
}

impl AccessLog {
    pub fn new(sample_rate: f64) -> Self {
        Self {
            sample_rate: sample_rate.clamp(0.0, 1.0),
        }
    }

    /// Whether this line is written: `RUST_LOG` lets the target through (as when lines
    /// were `tracing` events: `nodemesh::access=off` silences them), and it is sampled.
    fn sampled(&self) -> bool {
        tracing::enabled!(target: TARGET, tracing::Level::INFO)
            && (self.sample_rate >= 1.0
                || (self.sample_rate > 0.0 && fastrand::f64() < self.sample_rate))
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
        if self.sampled() {
            write(&connection_line(
                traffic,
                destination,
                sent,
                received,
                duration,
            ));
        }
    }

    /// An HTTP request was answered.
    pub fn request(&self, traffic: &Traffic, record: &RequestRecord<'_>) {
        if self.sampled() {
            write(&request_line(traffic, record));
        }
    }
}

/// The fields every line starts with.
#[derive(Serialize)]
struct Ends<'a> {
    timestamp: Now,
    level: &'static str,
    kind: &'static str,
    reporter: &'static str,
    src_workload: &'a str,
    src_namespace: &'a str,
    src_principal: &'a str,
    dst_workload: &'a str,
    dst_namespace: &'a str,
    dst_principal: &'a str,
    dst_service: &'a str,
}

impl<'a> Ends<'a> {
    fn of(traffic: &'a Traffic, kind: &'static str) -> Self {
        Self {
            timestamp: Now,
            level: "INFO",
            kind,
            reporter: match traffic.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            src_workload: &traffic.source.workload,
            src_namespace: &traffic.source.namespace,
            src_principal: &traffic.source.principal,
            dst_workload: &traffic.destination.workload,
            dst_namespace: &traffic.destination.namespace,
            dst_principal: &traffic.destination.principal,
            dst_service: &traffic.destination_service,
        }
    }
}

#[derive(Serialize)]
struct ConnectionLine<'a> {
    #[serde(flatten)]
    ends: Ends<'a>,
    destination: &'a str,
    mutual_tls: bool,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    target: &'static str,
}

fn connection_line<'a>(
    traffic: &'a Traffic,
    destination: &'a str,
    sent: u64,
    received: u64,
    duration: Duration,
) -> ConnectionLine<'a> {
    ConnectionLine {
        ends: Ends::of(traffic, "connection"),
        destination,
        mutual_tls: traffic.mutual_tls,
        bytes_sent: sent,
        bytes_received: received,
        duration_ms: duration.as_secs_f64() * 1000.0,
        target: TARGET,
    }
}

#[derive(Serialize)]
struct RequestLine<'a> {
    #[serde(flatten)]
    ends: Ends<'a>,
    mutual_tls: bool,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    route: &'a str,
    /// Empty when the request went nowhere.
    #[serde(serialize_with = "address_or_empty")]
    endpoint: Option<SocketAddr>,
    duration_ms: f64,
    trace_id: &'a str,
    target: &'static str,
}

fn request_line<'a>(traffic: &'a Traffic, record: &RequestRecord<'a>) -> RequestLine<'a> {
    RequestLine {
        ends: Ends::of(traffic, "request"),
        mutual_tls: traffic.mutual_tls,
        method: record.method,
        path: record.path,
        protocol: record.protocol,
        status: record.status,
        route: record.route,
        endpoint: record.endpoint,
        duration_ms: record.duration.as_secs_f64() * 1000.0,
        trace_id: record.trace_id,
        target: TARGET,
    }
}

fn address_or_empty<S: Serializer>(
    address: &Option<SocketAddr>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match address {
        Some(address) => serializer.collect_str(address),
        None => serializer.serialize_str(""),
    }
}

/// The time a line is written, as `tracing-subscriber` writes it (RFC 3339, UTC,
/// microseconds), and as the agent's other logs have it.
struct Now;

impl fmt::Display for Now {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(f))
    }
}

impl Serialize for Now {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The most a thread's line buffer keeps between lines.
const LINE_KEPT: usize = 16 * 1024;

thread_local! {
    /// The line being encoded: a buffer per thread, reused.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes `line` and hands it to the output.
fn write(line: &impl Serialize) {
    LINE.with_borrow_mut(|buffer| {
        buffer.clear();
        match serde_json::to_writer(&mut *buffer, line) {
            Ok(()) => {
                buffer.push(b'\n');
                access_output::append(buffer);
            }
            // Nothing here fails to encode (strings and numbers); say so if it ever does.
            Err(error) => tracing::error!(%error, "an access log line could not be encoded"),
        }
        // A line with a very long path would keep its size for good.
        if buffer.capacity() > LINE_KEPT {
            *buffer = Vec::new();
        }
    });
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::peer::Peer;

    fn traffic() -> Traffic {
        let peer = |workload: &str| Peer {
            workload: workload.to_owned(),
            namespace: "mesh".to_owned(),
            principal: format!("spiffe://cluster.local/ns/mesh/sa/{workload}"),
        };
        Traffic {
            reporter: Reporter::Destination,
            source: peer("client-a"),
            destination: peer("server-\"b\""),
            destination_service: "web.mesh.svc.cluster.local".to_owned(),
            mutual_tls: true,
        }
    }

    fn json(line: &impl Serialize) -> (String, Value) {
        let text = serde_json::to_string(line).expect("encodes");
        let value = serde_json::from_str(&text).expect("one JSON object");
        (text, value)
    }

    #[test]
    fn a_connection_line_has_every_field_in_order() {
        let traffic = traffic();
        let line = connection_line(
            &traffic,
            "198.18.1.11:7000",
            64,
            32,
            Duration::from_micros(1500),
        );
        let (text, value) = json(&line);
        let keys = [
            "timestamp",
            "level",
            "kind",
            "reporter",
            "src_workload",
            "src_namespace",
            "src_principal",
            "dst_workload",
            "dst_namespace",
            "dst_principal",
            "dst_service",
            "destination",
            "mutual_tls",
            "bytes_sent",
            "bytes_received",
            "duration_ms",
            "target",
        ];
        let at: Vec<usize> = (keys.iter())
            .map(|key| text.find(&format!("\"{key}\":")).expect(key))
            .collect();
        assert!(at.is_sorted(), "every field, in this order: {text}");
        assert_eq!(value.as_object().map(|o| o.len()), Some(keys.len()));
        assert_eq!(value["kind"], "connection");
        assert_eq!(value["reporter"], "destination");
        assert_eq!(value["dst_workload"], "server-\"b\"", "escaped: {text}");
        assert_eq!(value["bytes_sent"], 64);
        assert_eq!(value["duration_ms"], 1.5);
        assert_eq!(value["target"], TARGET);
        let timestamp = value["timestamp"].as_str().expect("a string");
        // 2026-12-05T04:15:50.123456Z
        assert_eq!(timestamp.len(), 27, "{timestamp}");
        assert!(timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T');
    }

    #[test]
    fn rust_log_can_turn_the_lines_off() {
        use tracing_subscriber::{EnvFilter, layer::SubscriberExt};
        let sampled = |filter: &str| {
            let subscriber = tracing_subscriber::registry().with(EnvFilter::new(filter));
            tracing::subscriber::with_default(subscriber, || AccessLog::new(1.0).sampled())
        };
        assert!(sampled("info"));
        assert!(!sampled("info,nodemesh::access=off"));
        assert!(!sampled("warn"));
        assert!(!AccessLog::new(0.0).sampled() && !sampled("nothing=info"));
    }

    #[test]
    fn a_request_line_says_where_it_went_or_nothing() {
        let traffic = traffic();
        let mut record = RequestRecord {
            method: "GET",
            path: "/echo",
            protocol: "http",
            status: 200,
            route: "mesh/web",
            endpoint: Some("198.18.2.11:8080".parse().expect("address")),
            duration: Duration::from_millis(2),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        };
        let (_, value) = json(&request_line(&traffic, &record));
        assert_eq!(value["kind"], "request");
        assert_eq!(value["endpoint"], "198.18.2.11:8080");
        assert_eq!(value["status"], 200);
        assert_eq!(value["trace_id"], record.trace_id);
        record.endpoint = None;
        let (_, value) = json(&request_line(&traffic, &record));
        assert_eq!(value["endpoint"], "");
    }
}
