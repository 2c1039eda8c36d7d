//! L7 authorization at the destination: an HBONE stream to a workload whose
//! AuthorizationPolicies look at HTTP methods or paths is parsed as HTTP, and each request
//! is decided on (source identity, port, method, path) before it reaches the application;
//! a denied request gets 403 with a body that says so, and the connection stays usable.
//!
//! Each request is decided with the policies in force when it arrives, not those of the
//! stream's start, and on its normalised path (`path`), which is also the path the
//! application gets. An `h2c` upgrade is removed from the request (`hop`); any other upgrade
//! turns the connection into bytes nothing inspects, so it passes only where the policies
//! allow the peer with no HTTP attributes at all, and ends when a change withdraws that. A
//! stream that turns out not to be HTTP is decided the same way, as a whole.
//!
//! The same serves plaintext from the node to a kubelet probe port that the pod's mode or a
//! policy refuses: only the probes' own requests reach the application.

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode, Uri,
    body::Incoming,
    client::conn::{http1, http2},
    http::uri::PathAndQuery,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};

use super::{path, revocation::stream_withdrawn};
use crate::peer::Traffic;
use crate::{
    identity::spiffe::SpiffeId,
    lifecycle::drain::Drain,
    proxy::{
        counting::{Meter, MeteredStream},
        detect::{self, Prefixed, Protocol},
        http::{
            Body, answer,
            hop::{self, bridge_upgrade},
            protocol_of, serve_requests,
        },
        relay::{Relayable, relay_until, reset},
    },
    state::{
        authorization::{Decision, RequestAttributes, decide},
        node::PodPolicies,
        probes::{GRPC_HEALTH_CHECK, ProbePort},
    },
    telemetry::{
        access::{AccessLog, RequestRecord},
        metrics::Metrics,
        report::ConnectionReport,
        trace::trace_id_of,
    },
};

/// Who is asking, and what decides, for every request on one stream.
pub struct Check {
    pub pod: String,
    pub policies: PodPolicies,
    pub source: Source,
    pub port: u16,
    /// How long the stream may take to show it is HTTP; `None` on an opaque port
    /// (`--opaque-ports`), where it is decided as a TCP stream without waiting.
    pub detect_wait: Option<Duration>,
    /// The stream's labels, reported by the destination.
    pub traffic: Traffic,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// The agent's drain: the HTTP server finishes gracefully when it begins.
    pub drain: Drain,
}

/// Where a stream comes from.
pub enum Source {
    /// A meshed peer, by the identity mutual TLS verified: the policies decide.
    Mesh(SpiffeId),
    /// Plaintext from the node to a probe port, which `refusal` refuses otherwise.
    NodeProbe {
        peer: IpAddr,
        probe: ProbePort,
        refusal: String,
    },
}

impl Check {
    /// The decision on a request (`http` is its method and normalised path), or on the
    /// stream as a whole when None.
    fn decide(&self, http: Option<(&str, &str)>) -> Decision {
        match &self.source {
            Source::Mesh(peer) => decide(
                &self.policies.current(),
                &RequestAttributes {
                    source: Some(peer),
                    port: self.port,
                    http,
                },
            ),
            Source::NodeProbe { probe, refusal, .. } => match http {
                Some((method, path)) if is_probe_request(probe, method, path) => Decision::Allow,
                _ => Decision::Deny(refusal.clone()),
            },
        }
    }

    fn peer(&self) -> String {
        match &self.source {
            Source::Mesh(peer) => peer.to_string(),
            Source::NodeProbe { peer, .. } => peer.to_string(),
        }
    }

    /// Resolves when a policy change denies the stream as a whole (an upgraded or opaque
    /// stream, which no request decision covers any more).
    fn withdrawal(&self) -> impl Future<Output = ()> + Send + 'static {
        let policies = self.policies.clone();
        let (pod, port) = (self.pod.clone(), self.port);
        let peer = match &self.source {
            Source::Mesh(peer) => Some(peer.clone()),
            Source::NodeProbe { .. } => None,
        };
        async move {
            // Only mesh streams are ever allowed as a whole.
            let Some(peer) = peer else { return };
            let by = stream_withdrawn(policies, &peer, port).await;
            tracing::warn!(%pod, %peer, port, policy = %by, "authorization withdrawn by a policy change: stream reset");
        }
    }
}

/// Whether a request is one the kubelet's probes on this port make.
fn is_probe_request(probe: &ProbePort, method: &str, normalized: &str) -> bool {
    let http = method == "GET"
        && probe
            .http_paths
            .iter()
            .any(|p| path::normalize(p).is_ok_and(|p| p == normalized));
    http || (probe.grpc && method == "POST" && normalized == GRPC_HEALTH_CHECK)
}

/// Serves `tunnel` towards `app` under `check`; returns the bytes read from and written to
/// the tunnel.
pub async fn serve<T>(mut tunnel: T, app: TcpStream, check: Check) -> (u64, u64)
where
    T: Relayable + Send + 'static,
{
    let detected = match check.detect_wait {
        None => detect::Detected {
            protocol: Protocol::Opaque,
            prefix: Vec::new(),
            timed_out: false,
        },
        Some(wait) => match detect::detect(&mut tunnel, Some(wait)).await {
            Ok(detected) => detected,
            // The client's end failed (a reset) before it said anything: so does the
            // application's.
            Err(_) => {
                reset(&app);
                tunnel.abort();
                return (0, 0);
            }
        },
    };
    let meter = Arc::new(Meter::default());
    let mut stream = MeteredStream::new(Prefixed::new(detected.prefix, tunnel), Arc::clone(&meter));
    match detected.protocol {
        Protocol::Http1 | Protocol::Http2 => {
            serve_http(stream, app, detected.protocol, Arc::new(check)).await;
        }
        _ => match check.decide(None) {
            Decision::Allow => {
                let report = ConnectionReport::open(
                    &check.metrics,
                    check.access_log,
                    &check.traffic,
                    &check.pod,
                );
                let (sent, received) = relay_until(stream, app, check.withdrawal()).await;
                report.close(sent, received);
            }
            Decision::Deny(by) => {
                tracing::warn!(pod = %check.pod, peer = %check.peer(), port = check.port, policy = %by, "authorization: non-HTTP stream denied");
                reset(&app);
                stream.abort();
            }
        },
    }
    (meter.read(), meter.written())
}

enum AppSender {
    Http1(Mutex<http1::SendRequest<Body>>),
    Http2(http2::SendRequest<Body>),
}

async fn serve_http<S>(stream: S, app: TcpStream, protocol: Protocol, check: Arc<Check>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app_io = TokioIo::new(app);
    let sender = match protocol {
        Protocol::Http2 => {
            match http2::Builder::new(TokioExecutor::new())
                .handshake(app_io)
                .await
            {
                Ok((sender, connection)) => {
                    tokio::spawn(connection);
                    AppSender::Http2(sender)
                }
                Err(error) => {
                    tracing::info!(pod = %check.pod, %error, "HTTP/2 to the application failed");
                    return;
                }
            }
        }
        _ => match http1::handshake(app_io).await {
            Ok((sender, connection)) => {
                tokio::spawn(connection.with_upgrades());
                AppSender::Http1(Mutex::new(sender))
            }
            Err(error) => {
                tracing::info!(pod = %check.pod, %error, "HTTP/1.1 to the application failed");
                return;
            }
        },
    };
    let sender = Arc::new(sender);
    let (pod, drain) = (check.pod.clone(), check.drain.clone());
    let handler = move |request| {
        let (sender, check) = (Arc::clone(&sender), Arc::clone(&check));
        async move { authorize(request, &sender, &check).await }
    };
    if let Err(error) = serve_requests(stream, protocol, &drain, handler).await {
        tracing::debug!(%pod, %error, "authorized HTTP stream ended with an error");
    }
}

/// Decides on one request, forwards it if allowed, and reports it.
async fn authorize(
    request: Request<Incoming>,
    sender: &AppSender,
    check: &Check,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let protocol = protocol_of(request.headers());
    let trace_id = trace_id_of(request.headers());
    let response = decide_and_forward(request, sender, check, &method).await;
    let took = started.elapsed();
    let status = response.status().as_u16();
    check
        .metrics
        .request(&check.traffic, protocol, status, took);
    check.access_log.request(
        &check.traffic,
        &RequestRecord {
            method: &method,
            path: &path,
            protocol,
            status,
            route: "",
            endpoint: None,
            duration: took,
            trace_id: &trace_id,
        },
    );
    response
}

async fn decide_and_forward(
    mut request: Request<Incoming>,
    sender: &AppSender,
    check: &Check,
    method: &str,
) -> Response<Body> {
    let peer = check.peer();
    let normalized = match path::normalize(request.uri().path()) {
        Ok(normalized) => normalized,
        Err(error) => {
            tracing::warn!(pod = %check.pod, %peer, port = check.port, %method, path = %request.uri().path(), %error, "authorization: path refused");
            return answer(StatusCode::BAD_REQUEST, format!("nodemesh: {error}\n"));
        }
    };
    if let Decision::Deny(by) = check.decide(Some((method, &normalized))) {
        tracing::warn!(pod = %check.pod, %peer, port = check.port, %method, path = %normalized, policy = %by, "authorization: request denied");
        let why = match &check.source {
            Source::Mesh(_) => "by authorization policy".to_owned(),
            Source::NodeProbe { refusal, .. } => {
                format!("({refusal}; from the node only the pod's kubelet probes pass)")
            }
        };
        return answer(
            StatusCode::FORBIDDEN,
            format!("nodemesh: {method} {normalized} denied to {peer} {why}\n"),
        );
    }
    let upgrade = hop::requested_upgrade(&mut request);
    if let Some(protocol) = &upgrade
        && let Decision::Deny(by) = check.decide(None)
    {
        tracing::warn!(pod = %check.pod, %peer, port = check.port, %protocol, policy = %by, "authorization: upgrade denied");
        return answer(
            StatusCode::FORBIDDEN,
            format!(
                "nodemesh: upgrade to {protocol} denied to {peer}: nothing after it can be inspected, and {by} does not allow {peer} without HTTP attributes\n"
            ),
        );
    }
    let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    hop::strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    if normalized != parts.uri.path() {
        match with_path(&parts.uri, &normalized) {
            Ok(uri) => parts.uri = uri,
            Err(error) => return answer(StatusCode::BAD_REQUEST, format!("nodemesh: {error}\n")),
        }
    }
    let request = Request::from_parts(parts, body.boxed());
    let result = match sender {
        AppSender::Http1(sender) => {
            let mut sender = sender.lock().await;
            match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(error) => Err(error),
            }
        }
        AppSender::Http2(sender) => sender.clone().send_request(request).await,
    };
    match result {
        Ok(mut response) => {
            if upgrade.is_some() && response.status() == StatusCode::SWITCHING_PROTOCOLS {
                bridge_upgrade(
                    downstream_upgrade,
                    hyper::upgrade::on(&mut response),
                    check.withdrawal(),
                );
            } else {
                hop::strip_hop_by_hop(response.headers_mut(), false);
            }
            response.map(|body| body.boxed())
        }
        Err(error) => {
            tracing::info!(pod = %check.pod, %error, "the application failed the request");
            answer(
                StatusCode::BAD_GATEWAY,
                format!("nodemesh: the application failed the request: {error}\n"),
            )
        }
    }
}

/// `uri` with its path replaced by `path` (the query kept).
fn with_path(uri: &Uri, path: &str) -> Result<Uri, hyper::http::Error> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query)?);
    Ok(Uri::from_parts(parts)?)
}
