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
//! certificate expiry, protocol detection outcomes, configuration errors.

use std::{
    collections::HashSet,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
    time::Duration,
};

use super::connections::DetectionOutcome;
use crate::peer::{Peer, Reporter, Traffic};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
    pod: String,
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
    /// Hashes of the label sets in use, per kind (requests, tcp), for the bound.
    seen: Mutex<[HashSet<u64>; 2]>,
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
        Self {
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

impl Traffic {
    fn bounded(&self, kind: usize, metrics: &Metrics) -> Traffic {
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        let key = hasher.finish();
        let mut seen = metrics.seen.lock().unwrap_or_else(|p| p.into_inner());
        let set = &mut seen[kind];
        if set.contains(&key) || set.len() < MAX_SERIES {
            set.insert(key);
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
        let labels = traffic.bounded(0, self).request_labels(protocol, status);
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64() * 1000.0);
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
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_format_names_counters_by_their_sample() {
        let openmetrics = "# HELP istio_requests HTTP requests.\n# TYPE istio_requests counter\nistio_requests_total{a=\"b\"} 3\n# HELP up Up.\n# TYPE up gauge\n# UNIT up seconds\nup 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(openmetrics),
            "# HELP istio_requests_total HTTP requests.\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"b\"} 3\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
        assert_eq!(Exposition::negotiate(None), Exposition::PrometheusText);
        assert_eq!(
            Exposition::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.5"
            )),
            Exposition::OpenMetrics
        );
    }

    fn traffic(destination: &str) -> Traffic {
        Traffic {
            reporter: Reporter::Source,
            source: Peer {
                workload: "client".into(),
                namespace: "shop".into(),
                principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
            },
            destination: Peer {
                workload: destination.into(),
                namespace: "shop".into(),
                principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
            },
            destination_service: "web.shop.svc.cluster.local".into(),
            mutual_tls: true,
        }
    }

    #[test]
    fn istio_names_and_labels_and_exact_counts() {
        let metrics = Metrics::default();
        for _ in 0..3 {
            metrics.request(&traffic("web"), "http", 200, Duration::from_millis(7));
        }
        metrics.request(&traffic("web"), "http", 503, Duration::from_millis(1));
        metrics.tcp_opened(&traffic("db"));
        metrics.tcp_closed(&traffic("db"), 100, 2000);
        metrics.detected(DetectionOutcome::Http1);
        let text = metrics.encode(Exposition::OpenMetrics);
        let labels = "connection_security_policy=\"mutual_tls\"";
        assert!(text.contains("istio_requests_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",destination_workload=\"web\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"web.shop.svc.cluster.local\",request_protocol=\"http\",response_code=\"200\","), "{text}");
        assert!(
            text.contains(&format!("response_code=\"200\",{labels}}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!("response_code=\"503\",{labels}}} 1")),
            "{text}"
        );
        assert!(
            text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",destination_workload=\"db\""), "{text}");
        assert!(
            text.contains(&format!("request_protocol=\"tcp\",{labels}}} 2000")),
            "{text}"
        );
        assert!(
            text.contains("nodemesh_protocol_detection_total{outcome=\"http1\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn the_grafana_dashboard_uses_only_metrics_the_agent_exports() {
        let metrics = Metrics::default();
        metrics.request(&traffic("web"), "http", 200, Duration::from_millis(1));
        metrics.tcp_opened(&traffic("db"));
        metrics.tcp_closed(&traffic("db"), 1, 1);
        metrics.detected(DetectionOutcome::Http1);
        metrics.set_agent_state(1, &[("enrolled_cgroups".into(), 1)], &[("id".into(), 1)], 0);
        let exported = metrics.encode(Exposition::OpenMetrics);
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/nodemesh-dashboard.json"
        );
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
        let names = regex::Regex::new(r"\b(?:istio|nodemesh)_[a-z_]+").unwrap();
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for name in names.find_iter(expr) {
                    let name = name.as_str();
                    assert!(
                        exported.lines().any(|l| l.starts_with(&format!("{name}{{"))
                            || l.starts_with(&format!("{name} "))),
                        "panel {:?} uses {name}, which the agent does not export",
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 12, "{checked}");
    }

    #[test]
    fn label_sets_are_bounded() {
        let metrics = Metrics::default();
        for i in 0..(MAX_SERIES + 10) {
            metrics.tcp_opened(&traffic(&format!("w{i}")));
        }
        let text = metrics.encode(Exposition::OpenMetrics);
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .count();
        assert_eq!(series, MAX_SERIES + 1, "the rest is counted under `other`");
        assert!(text.contains("destination_workload=\"other\""));
    }
}
