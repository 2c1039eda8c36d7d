//! Prometheus metrics (`/metrics` on the admin port), with prometheus-client.
//!
//! Traffic metrics use Istio's names and standard labels, so dashboards built for Istio
//! (Kiali, the Istio Grafana dashboards) read them unchanged:
//! `istio_requests_total` and `istio_request_duration_milliseconds` for HTTP requests the
//! proxy parsed, and `istio_tcp_{sent,received}_bytes_total` and
//! `istio_tcp_connections_{opened,closed}_total` for connections relayed as opaque TCP.
//! `reporter` is `source` for what the client's node proxy saw and `destination` for what
//! the destination's saw (HBONE streams, plaintext, and requests authorization parsed).
//! Bytes are application payload bytes, as the applications sent them.
//!
//! Cardinality is bounded: every label value comes from the cluster (workloads, namespaces,
//! identities, Services, status codes), never from an address outside it (unknown peers are
//! `unknown`), and each family holds at most `MAX_SERIES` label sets; past that, new ones
//! are counted with the destination labels set to `other`, so a pod scanning the cluster
//! cannot grow the agent's memory without bound.
//!
//! The agent's own metrics are `nodemesh_*`: enrolled pods, datapath map occupancy,
//! certificate expiry, protocol detection outcomes, configuration errors, and, on nodes with
//! a zone, traffic to Service endpoints by source and destination zone
//! (`nodemesh_zone_{requests,connections,bytes}_total`, with `same_zone`) and requests sent
//! beyond their preferred endpoints (`nodemesh_zone_spills_total`, by Service and reason).
//! Zones and Services come from the cluster, so these stay small.

use std::{
    collections::HashSet,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
    time::Duration,
};

use super::connections::DetectionOutcome;
use crate::peer::{Peer, Reporter, Traffic, ZonePair};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Label sets per family before new ones are folded into `other`.
pub const MAX_SERIES: usize = 10_000;
const OTHER: &str = "other";

/// A Service's name as Istio labels it: `name.namespace.svc.cluster.local`, from
/// `namespace/name`.
pub fn service_fqdn(service: &str) -> String {
    match service.split_once('/') {
        Some((namespace, name)) => format!("{name}.{namespace}.svc.cluster.local"),
        None => service.to_owned(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    request_protocol: &'static str,
    response_code: String,
    connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    request_protocol: &'static str,
    connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// DNS queries by record type (a fixed set, `other` for the rest) and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    query_type: &'static str,
    outcome: &'static str,
}

/// Source and destination zone (`unknown` when the endpoint has none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabels {
    source_zone: String,
    destination_zone: String,
    same_zone: &'static str,
}

impl ZoneLabels {
    fn of(zones: &ZonePair) -> Self {
        let destination = zones.destination.as_deref().unwrap_or(crate::peer::UNKNOWN);
        Self {
            source_zone: zones.source.to_string(),
            destination_zone: destination.to_owned(),
            same_zone: if *zones.source == *destination {
                "true"
            } else {
                "false"
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpillLabels {
    destination_service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
    pod: String,
}

/// The series one HTTP request is counted in: `istio_requests_total` and
/// `istio_request_duration_milliseconds` for one label set. Whoever counts a run of
/// requests with the same labels (a client connection of the L7 proxy) keeps it, and
/// counting into it again skips building, bounding and hashing the label set for each
/// family. The traffic families are never cleared, so a series kept stays the one
/// `/metrics` shows.
#[derive(Clone)]
pub struct RequestSeries {
    requests: Counter,
    duration: Histogram,
}

impl RequestSeries {
    pub fn record(&self, took: Duration) {
        self.requests.inc();
        self.duration.observe(took.as_secs_f64() * 1000.0);
    }
}

/// The series of one zone pair: `nodemesh_zone_requests_total` and
/// `nodemesh_zone_bytes_total` (kept as `RequestSeries` is).
#[derive(Clone)]
pub struct ZoneSeries {
    pub requests: Counter,
    pub bytes: Counter,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    enrolled_pods: Gauge,
    pending_pods: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    certificate_expiry: Family<IdentityLabels, Gauge>,
    detection: Family<OutcomeLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    config_errors: Gauge,
    dns_queries: Family<DnsLabels, Counter>,
    dns_forward_duration: Histogram,
    zone_requests: Family<ZoneLabels, Counter>,
    zone_connections: Family<ZoneLabels, Counter>,
    zone_bytes: Family<ZoneLabels, Counter>,
    zone_spills: Family<SpillLabels, Counter>,
    /// Hashes of the label sets in use, per kind (requests, tcp, zone pairs, spills), for
    /// the bound.
    seen: Mutex<[HashSet<u64>; 4]>,
}

fn duration_histogram() -> Histogram {
    // Istio's default buckets for istio_request_duration_milliseconds.
    Histogram::new([
        1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
        60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let enrolled_pods = Gauge::default();
        let pending_pods = Gauge::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let certificate_expiry = Family::<IdentityLabels, Gauge>::default();
        let detection = Family::<OutcomeLabels, Counter>::default();
        let config_errors = Gauge::default();
        // prometheus-client appends `_total` to counters.
        registry.register("istio_requests", "HTTP requests", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "HTTP request duration, from the request head to the response head",
            request_duration.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes from source to destination",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes from destination to source",
            tcp_received.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "nodemesh_enrolled_pods",
            "Pods enrolled on this node",
            enrolled_pods.clone(),
        );
        registry.register(
            "nodemesh_pending_pods",
            "Meshed pods of this node not enrolled yet, held closed meanwhile (reasons in /config_dump)",
            pending_pods.clone(),
        );
        registry.register(
            "nodemesh_datapath_map_entries",
            "Entries in each pinned eBPF map",
            map_entries.clone(),
        );
        registry.register(
            "nodemesh_certificate_expiry_seconds",
            "Seconds until each workload certificate held by this node expires",
            certificate_expiry.clone(),
        );
        registry.register(
            "nodemesh_protocol_detection",
            "Protocol detection outcomes on connections to Service ports",
            detection.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "nodemesh_connections_refused",
            "Connections reset because their pod was over one of its bounds (proxy/limits.rs)",
            refused.clone(),
        );
        registry.register(
            "nodemesh_config_errors",
            "Cluster objects currently rejected (their last good version is in use)",
            config_errors.clone(),
        );
        let dns_queries = Family::<DnsLabels, Counter>::default();
        registry.register(
            "nodemesh_dns_queries",
            "DNS queries of meshed pods by record type and outcome (local, local_nxdomain, forwarded, failed, malformed, dropped)",
            dns_queries.clone(),
        );
        // 0.1 ms to 5 s: a resolver on the node answers in well under a millisecond.
        let dns_forward_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.5, 13),
        );
        registry.register(
            "nodemesh_dns_forward_duration_seconds",
            "Time from forwarding a DNS query to the pod's resolver to its answer",
            dns_forward_duration.clone(),
        );
        let zone_requests = Family::<ZoneLabels, Counter>::default();
        registry.register(
            "nodemesh_zone_requests",
            "HTTP requests to Service endpoints by the client's and the endpoint's zone",
            zone_requests.clone(),
        );
        let zone_connections = Family::<ZoneLabels, Counter>::default();
        registry.register(
            "nodemesh_zone_connections",
            "Connections relayed as TCP to Service endpoints by the client's and the endpoint's zone",
            zone_connections.clone(),
        );
        let zone_bytes = Family::<ZoneLabels, Counter>::default();
        registry.register(
            "nodemesh_zone_bytes",
            "Payload bytes both ways to and from Service endpoints (TCP connections, HTTP bodies) by zone",
            zone_bytes.clone(),
        );
        let zone_spills = Family::<SpillLabels, Counter>::default();
        registry.register(
            "nodemesh_zone_spills",
            "HTTP requests sent beyond their preferred (same-zone or hinted) endpoints, by reason: overloaded, unavailable",
            zone_spills.clone(),
        );
        Self {
            zone_requests,
            zone_connections,
            zone_bytes,
            zone_spills,
            registry,
            requests,
            request_duration,
            tcp_sent,
            tcp_received,
            tcp_opened,
            tcp_closed,
            enrolled_pods,
            pending_pods,
            map_entries,
            certificate_expiry,
            detection,
            refused,
            config_errors,
            dns_queries,
            dns_forward_duration,
            seen: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Whether the label set `labels` of `kind` is in use or may be added under the bound.
    fn within_bound(&self, kind: usize, labels: &impl Hash) -> bool {
        let mut hasher = DefaultHasher::new();
        labels.hash(&mut hasher);
        let key = hasher.finish();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let set = &mut seen[kind];
        if set.contains(&key) || set.len() < MAX_SERIES {
            set.insert(key);
            return true;
        }
        false
    }

    /// The zone labels of `zones`, or `other` for both zones past the bound (zones are
    /// whatever EndpointSlices say).
    fn zone_labels(&self, zones: &ZonePair) -> ZoneLabels {
        if self.within_bound(2, zones) {
            return ZoneLabels::of(zones);
        }
        ZoneLabels {
            source_zone: OTHER.into(),
            destination_zone: OTHER.into(),
            same_zone: "false",
        }
    }
}

impl Traffic {
    fn bounded(&self, kind: usize, metrics: &Metrics) -> Traffic {
        if metrics.within_bound(kind, self) {
            return self.clone();
        }
        Traffic {
            destination: Peer {
                workload: OTHER.into(),
                namespace: OTHER.into(),
                principal: OTHER.into(),
            },
            destination_service: OTHER.into(),
            ..self.clone()
        }
    }

    fn reporter(&self) -> &'static str {
        match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn security(&self) -> &'static str {
        if self.mutual_tls {
            "mutual_tls"
        } else {
            "none"
        }
    }

    fn tcp_labels(&self) -> TcpLabels {
        TcpLabels {
            reporter: self.reporter(),
            source_workload: self.source.workload.clone(),
            source_workload_namespace: self.source.namespace.clone(),
            source_principal: self.source.principal.clone(),
            destination_workload: self.destination.workload.clone(),
            destination_workload_namespace: self.destination.namespace.clone(),
            destination_principal: self.destination.principal.clone(),
            destination_service: self.destination_service.clone(),
            request_protocol: "tcp",
            connection_security_policy: self.security(),
        }
    }

    fn request_labels(&self, protocol: &'static str, status: u16) -> RequestLabels {
        let tcp = self.tcp_labels();
        RequestLabels {
            reporter: tcp.reporter,
            source_workload: tcp.source_workload,
            source_workload_namespace: tcp.source_workload_namespace,
            source_principal: tcp.source_principal,
            destination_workload: tcp.destination_workload,
            destination_workload_namespace: tcp.destination_workload_namespace,
            destination_principal: tcp.destination_principal,
            destination_service: tcp.destination_service,
            request_protocol: protocol,
            response_code: status.to_string(),
            connection_security_policy: tcp.connection_security_policy,
        }
    }
}

impl Metrics {
    pub fn tcp_opened(&self, traffic: &Traffic) {
        let labels = traffic.bounded(1, self).tcp_labels();
        self.tcp_opened.get_or_create(&labels).inc();
    }

    /// A relayed connection ended having carried `sent` bytes from the source and
    /// `received` bytes back.
    pub fn tcp_closed(&self, traffic: &Traffic, sent: u64, received: u64) {
        let labels = traffic.bounded(1, self).tcp_labels();
        self.tcp_sent.get_or_create(&labels).inc_by(sent);
        self.tcp_received.get_or_create(&labels).inc_by(received);
        self.tcp_closed.get_or_create(&labels).inc();
    }

    /// One HTTP request; `protocol` is `http` or `grpc`.
    pub fn request(&self, traffic: &Traffic, protocol: &'static str, status: u16, took: Duration) {
        self.request_series(traffic, protocol, status).record(took);
    }

    /// The series a request with these labels is counted in, for whoever counts a run of
    /// them (`RequestSeries`).
    pub fn request_series(
        &self,
        traffic: &Traffic,
        protocol: &'static str,
        status: u16,
    ) -> RequestSeries {
        let labels = traffic.bounded(0, self).request_labels(protocol, status);
        RequestSeries {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
        }
    }

    /// The series of HTTP requests to Service endpoints between these zones, and of the
    /// bytes their bodies carry: the labels built once for both.
    pub fn zone_series(&self, zones: &ZonePair) -> ZoneSeries {
        let labels = self.zone_labels(zones);
        ZoneSeries {
            requests: self.zone_requests.get_or_create(&labels).clone(),
            bytes: self.zone_bytes.get_or_create(&labels).clone(),
        }
    }

    /// A TCP connection to a Service endpoint ended having carried `bytes` both ways.
    pub fn zone_connection(&self, zones: &ZonePair, bytes: u64) {
        let labels = self.zone_labels(zones);
        self.zone_connections.get_or_create(&labels).inc();
        self.zone_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// A request to `service` (`namespace/name`) sent beyond its preferred endpoints.
    pub fn zone_spill(&self, service: &str, reason: &'static str) {
        let destination_service = match self.within_bound(3, &(service, reason)) {
            true => service_fqdn(service),
            false => OTHER.into(),
        };
        let labels = SpillLabels {
            destination_service,
            reason,
        };
        self.zone_spills.get_or_create(&labels).inc();
    }

    pub fn detected(&self, outcome: DetectionOutcome) {
        self.detection
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A connection of `pod` reset for being over the bound `reason`. (The pods of one node
    /// bound the label's values.)
    pub fn refused(&self, reason: &'static str, pod: &str) {
        self.refused
            .get_or_create(&RefusedLabels {
                reason,
                pod: pod.to_owned(),
            })
            .inc();
    }

    /// The agent's own state, set just before each scrape.
    pub fn set_agent_state(
        &self,
        enrolled_pods: usize,
        map_entries: &[(String, u64)],
        certificate_expiry: &[(String, i64)],
        config_errors: usize,
    ) {
        self.enrolled_pods.set(enrolled_pods as i64);
        for (map, entries) in map_entries {
            self.map_entries
                .get_or_create(&MapLabels { map: map.clone() })
                .set(*entries as i64);
        }
        self.certificate_expiry.clear();
        for (identity, seconds) in certificate_expiry {
            self.certificate_expiry
                .get_or_create(&IdentityLabels {
                    identity: identity.clone(),
                })
                .set(*seconds);
        }
        self.config_errors.set(config_errors as i64);
    }

    /// Meshed pods not enrolled yet, set just before each scrape.
    /// Counts one DNS query of `query_type` (kept only for the common types) and `outcome`.
    pub fn dns_query(&self, query_type: &str, outcome: &'static str) {
        const TYPES: [&str; 8] = ["A", "AAAA", "SRV", "PTR", "TXT", "CNAME", "MX", "NS"];
        let query_type = TYPES
            .iter()
            .find(|t| **t == query_type)
            .copied()
            .unwrap_or("other");
        self.dns_queries
            .get_or_create(&DnsLabels {
                query_type,
                outcome,
            })
            .inc();
    }

    /// Observes how long the pod's resolver took to answer a forwarded query.
    pub fn dns_forwarded(&self, took: std::time::Duration) {
        self.dns_forward_duration.observe(took.as_secs_f64());
    }

    pub fn set_pending_pods(&self, pending_pods: usize) {
        self.pending_pods.set(pending_pods as i64);
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Exposition) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::warn!("encoding metrics failed");
        }
        match format {
            Exposition::OpenMetrics => text,
            Exposition::PrometheusText => openmetrics_to_prometheus_text(&text),
        }
    }
}

/// The two text formats scrapers ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 (`application/openmetrics-text`), what Prometheus asks for first.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain`), for everything else: older scrapers,
    /// `promtool check metrics`, curl.
    PrometheusText,
}

impl Exposition {
    /// The format an `Accept` header asks for: OpenMetrics only when it is named.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// prometheus-client writes OpenMetrics only. In the 0.0.4 format a counter's HELP and TYPE
/// name the sample (`x_total`, not the family `x`), and there is no UNIT or EOF line.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(family) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(family.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (family, tail) = rest.split_once(' ')?;
            counters
                .contains(family)
                .then(|| format!("{prefix}{family}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
