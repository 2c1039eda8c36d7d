//! Span export over OTLP/HTTP (JSON encoding) to a collector, when `--otlp-endpoint` is set.
//!
//! The L7 proxy makes one span per request (`telemetry::trace` gives it its ids from the
//! request's `traceparent`). Spans are queued (at most `QUEUE` waiting; more are dropped and
//! counted, never blocking a request) and posted in batches of up to `BATCH`, at least every
//! `FLUSH_EVERY`, as `ExportTraceServiceRequest` JSON to the endpoint (e.g.
//! `http://otel-collector:4318/v1/traces`).
//!
//! Written here rather than with opentelemetry-otlp: the proxy already knows its span ids
//! (they come from the request), needs no context propagation machinery, and the SDK's batch
//! processor would bring its own runtime thread and HTTP client stack for a POST of JSON.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::mpsc};

use super::{access::RequestRecord, trace::SpanIds};
use crate::peer::Traffic;

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const POST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "--otlp-endpoint {0:?}: an http:// URL with a host and a path, e.g. http://otel-collector:4318/v1/traces"
    )]
    Endpoint(String),
}

/// Exports spans, or does nothing when no endpoint is configured.
#[derive(Default)]
pub struct Tracer {
    queue: Option<mpsc::Sender<Value>>,
    dropped: AtomicU64,
}

impl Tracer {
    /// Starts the exporter task for `endpoint`, naming this node in the spans' resource.
    pub fn start(endpoint: &str, node: &str) -> Result<Self, OtlpError> {
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| OtlpError::Endpoint(endpoint.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(OtlpError::Endpoint(endpoint.to_owned()));
        }
        let (queue, spans) = mpsc::channel(QUEUE);
        tokio::spawn(export_loop(uri, node.to_owned(), spans));
        Ok(Self {
            queue: Some(queue),
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues the span of one request the proxy served.
    pub fn export(&self, span: &SpanIds, request: &RequestRecord<'_>, traffic: &Traffic) {
        let (method, path, status) = (request.method, request.path, request.status);
        let Some(queue) = &self.queue else {
            return;
        };
        if !span.sampled {
            return;
        }
        let end = SystemTime::now();
        let start = end.checked_sub(request.duration).unwrap_or(end);
        let nanos = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos().to_string())
                .unwrap_or_default()
        };
        let attribute = |key: &str, value: Value| json!({"key": key, "value": value});
        let text = |s: &str| json!({"stringValue": s});
        let record = json!({
            "traceId": hex::encode(span.trace_id),
            "spanId": hex::encode(span.span_id),
            "parentSpanId": span.parent_span_id.map(hex::encode).unwrap_or_default(),
            "name": format!("{method} {path}"),
            // SPAN_KIND_CLIENT: the proxy calls the destination on the client's behalf.
            "kind": 3,
            "startTimeUnixNano": nanos(start),
            "endTimeUnixNano": nanos(end),
            "attributes": [
                attribute("http.request.method", text(method)),
                attribute("url.path", text(path)),
                attribute("http.response.status_code", json!({"intValue": status.to_string()})),
                attribute("source.workload", text(&traffic.source.workload)),
                attribute("source.principal", text(&traffic.source.principal)),
                attribute("destination.workload", text(&traffic.destination.workload)),
                attribute("destination.principal", text(&traffic.destination.principal)),
                attribute("destination.service", text(&traffic.destination_service)),
            ],
            // STATUS_CODE_ERROR for 5xx, unset otherwise.
            "status": {"code": if status >= 500 { 2 } else { 0 }},
        });
        if queue.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn export_loop(endpoint: Uri, node: String, mut spans: mpsc::Receiver<Value>) {
    let mut batch = Vec::new();
    loop {
        let flush_at = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(flush_at, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let body = json!({
            "resourceSpans": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": "nodemesh"}},
                    {"key": "k8s.node.name", "value": {"stringValue": node}},
                ]},
                "scopeSpans": [{
                    "scope": {"name": "nodemesh", "version": env!("CARGO_PKG_VERSION")},
                    "spans": std::mem::take(&mut batch),
                }],
            }],
        });
        match tokio::time::timeout(POST_TIMEOUT, post(&endpoint, body.to_string())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%endpoint, %error, "OTLP export failed; spans dropped")
            }
            Err(_) => tracing::warn!(%endpoint, "OTLP export timed out; spans dropped"),
        }
    }
}

/// Why a batch of spans did not reach the collector.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Request(#[from] hyper::http::Error),
    #[error("collector answered {0}")]
    Status(hyper::StatusCode),
}

async fn post(endpoint: &Uri, body: String) -> Result<(), ExportError> {
    let host = endpoint.host().unwrap_or_default();
    let port = endpoint.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(ExportError::Connect)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let path = endpoint
        .path_and_query()
        .map_or("/v1/traces", |p| p.as_str());
    let request = Request::post(path)
        .header(
            hyper::header::HOST,
            endpoint.authority().map_or(host, |a| a.as_str()),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(ExportError::Status(status))
    }
}
