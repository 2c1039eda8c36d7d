//! One HTTP request through the L7 proxy: route, filters, backend and endpoint choice,
//! timeouts and retries, and the answers the proxy gives itself (404, 503, 504, redirects).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version as HttpVersion,
    body::Incoming,
    header::{self, HeaderValue},
    http::uri::{Authority, PathAndQuery, Scheme},
};

use super::{
    balance::{InFlight, Outcome, Placement},
    context::{OutboundContext, SourcePod},
    pool::{UpstreamError, Version},
    upstream::DialError,
};
use crate::peer::{Peer, Reporter, Traffic, UNKNOWN, ZonePair};
use crate::{
    proxy::{
        detect::Protocol,
        hbone::error::HboneError,
        http::{
            Body, answer,
            hop::{self, bridge_upgrade},
            protocol_of,
        },
        inbound::admission,
    },
    state::{
        routes::{Backend, RequestMatch, RequestView, RouteDecision, Rule},
        services::Frontend,
    },
    telemetry::{
        access::RequestRecord,
        metrics::{self, RequestSeries, ZoneSeries},
        trace,
    },
};

/// One client connection the L7 proxy serves.
pub struct ClientConnection {
    pub pod: Arc<SourcePod>,
    pub ctx: Arc<OutboundContext>,
    pub frontend: Frontend,
    /// The Service address the client dialled.
    pub original: SocketAddr,
    pub protocol: Protocol,
    counted: Mutex<Counted>,
}

/// The series this connection's requests were last counted in, with their labels. A
/// client's requests mostly carry the same labels, and finding a series by its labels cost
/// as much as the rest of a request's telemetry (docs/benchmarks.md, "Request paths").
#[derive(Default)]
struct Counted {
    request: Option<(Traffic, &'static str, u16, RequestSeries)>,
    zones: Option<(ZonePair, ZoneSeries)>,
}

impl ClientConnection {
    /// A connection to the Service port `frontend` whose protocol is not detected yet.
    pub fn new(
        pod: Arc<SourcePod>,
        ctx: Arc<OutboundContext>,
        frontend: Frontend,
        original: SocketAddr,
    ) -> Self {
        Self {
            pod,
            ctx,
            frontend,
            original,
            protocol: Protocol::Opaque,
            counted: Mutex::default(),
        }
    }

    fn request_series(
        &self,
        traffic: &Traffic,
        protocol: &'static str,
        status: u16,
    ) -> RequestSeries {
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((labels, kept_protocol, kept_status, series)) = &counted.request
            && (labels, *kept_protocol, *kept_status) == (traffic, protocol, status)
        {
            return series.clone();
        }
        let series = self.ctx.metrics.request_series(traffic, protocol, status);
        counted.request = Some((traffic.clone(), protocol, status, series.clone()));
        series
    }

    fn zone_series(&self, zones: &ZonePair) -> ZoneSeries {
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((kept, series)) = &counted.zones
            && kept == zones
        {
            return series.clone();
        }
        let series = self.ctx.metrics.zone_series(zones);
        counted.zones = Some((zones.clone(), series.clone()));
        series
    }
}

/// Where a request went, as far as it got.
#[derive(Default)]
pub struct Reached {
    /// `namespace/name` of the matched HTTPRoute, if any.
    route: String,
    /// `namespace/name` of the backend Service chosen.
    backend: Option<String>,
    endpoint: Option<SocketAddr>,
    /// The series of this node's zone and the endpoint's, when this node has a zone.
    zones: Option<ZoneSeries>,
}

/// Serves one request and reports it (metrics, access log, trace span).
pub async fn handle(
    mut request: Request<Incoming>,
    connection: &ClientConnection,
) -> Response<Body> {
    let started = Instant::now();
    let span = trace::propagate(request.headers_mut());
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let protocol = protocol_of(request.headers());
    let mut reached = Reached::default();
    let response = route_and_forward(request, connection, &mut reached).await;
    let took = started.elapsed();
    let ctx = &connection.ctx;
    let destination = reached
        .endpoint
        .map_or_else(Peer::unknown, |endpoint| ctx.peer_of(endpoint.ip()));
    let traffic = Traffic {
        reporter: Reporter::Source,
        source: connection.pod.peer(),
        mutual_tls: ctx.hbone.is_some() && destination.principal != UNKNOWN,
        destination,
        destination_service: metrics::service_fqdn(
            reached
                .backend
                .as_deref()
                .unwrap_or(&connection.frontend.service),
        ),
    };
    let status = response.status().as_u16();
    connection
        .request_series(&traffic, protocol, status)
        .record(took);
    if let Some(zones) = &reached.zones {
        zones.requests.inc();
    }
    let trace_id = span.trace_id_hex();
    let record = RequestRecord {
        method: &method,
        path: &path,
        protocol,
        status,
        route: &reached.route,
        endpoint: reached.endpoint,
        duration: took,
        trace_id: &trace_id,
    };
    ctx.access_log.request(&traffic, &record);
    ctx.tracer.export(&span, &record, &traffic);
    response
}

async fn route_and_forward(
    request: Request<Incoming>,
    connection: &ClientConnection,
    reached: &mut Reached,
) -> Response<Body> {
    let routes = Arc::clone(&connection.ctx.state.borrow().routes);
    let view = RequestView {
        method: request.method(),
        path: request.uri().path(),
        query: request.uri().query(),
        headers: request.headers(),
    };
    let frontend = &connection.frontend;
    let default_rule;
    let (rule, matcher, route): (&Rule, Option<&RequestMatch>, &str) = match routes.decide(
        &frontend.service,
        frontend.port,
        &connection.pod.namespace,
        &view,
    ) {
        RouteDecision::Matched {
            route,
            matcher,
            rule,
        } => {
            reached.route = route.to_owned();
            (rule.as_ref(), Some(matcher), route)
        }
        RouteDecision::NoMatch => {
            return answer(
                StatusCode::NOT_FOUND,
                format!(
                    "nodemesh: no route rule for {} matches {} {}\n",
                    frontend.service,
                    request.method(),
                    request.uri().path()
                ),
            );
        }
        RouteDecision::Unrouted => {
            default_rule = Rule {
                backends: vec![Backend {
                    service: frontend.service.clone(),
                    port: frontend.port,
                    weight: 1,
                }],
                ..Default::default()
            };
            (&default_rule, None, "")
        }
    };
    if let Some(redirect) = &rule.redirect {
        return redirect_response(&request, matcher, redirect, connection.original);
    }
    let deadline = rule.request_timeout;
    let forwarding = forward(request, rule, matcher, connection, reached);
    let mut response = match deadline {
        Some(limit) => match tokio::time::timeout(limit, forwarding).await {
            Ok(response) => response,
            Err(_) => answer(
                StatusCode::GATEWAY_TIMEOUT,
                format!("nodemesh: upstream request timeout ({limit:?}, route {route})\n"),
            ),
        },
        None => forwarding.await,
    };
    if let Some(modifier) = &rule.response_headers {
        modifier.apply(response.headers_mut());
    }
    response
}

async fn forward(
    mut request: Request<Incoming>,
    rule: &Rule,
    matcher: Option<&RequestMatch>,
    connection: &ClientConnection,
    reached: &mut Reached,
) -> Response<Body> {
    let upgrade = hop::requested_upgrade(&mut request).is_some();
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    if let Some(modifier) = &rule.request_headers {
        modifier.apply(&mut parts.headers);
    }
    let authority = request_authority(&parts.uri, &parts.headers, connection.original);
    let mut path = parts
        .uri
        .path_and_query()
        .map_or("/", PathAndQuery::as_str)
        .to_owned();
    let mut authority = authority;
    if let Some(rewrite) = &rule.rewrite {
        if let Some(hostname) = &rewrite.hostname {
            authority = hostname.to_str().unwrap_or_default().to_owned();
        }
        if let (Some(modifier), Some(matcher)) = (&rewrite.path, matcher) {
            let (old_path, query) = match path.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (path.clone(), None),
            };
            let new_path = matcher.rewrite_path(modifier, &old_path);
            path = match query {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
        }
    }
    hop::strip_hop_by_hop(&mut parts.headers, upgrade);
    let version = match connection.protocol {
        Protocol::Http2 => Version::Http2,
        _ => Version::Http1,
    };
    // A request is sent again only when that is safe: an idempotent method without a body.
    let bodiless = is_bodiless(&parts.headers, &body);
    let retry = rule
        .retry
        .as_ref()
        .filter(|_| bodiless && is_idempotent(&parts.method) && !upgrade);
    let attempts = 1 + retry.map_or(0, |r| r.attempts);
    let mut body = Some(body);
    let mut last = None;
    for attempt in 0..attempts {
        if attempt > 0
            && let Some(retry) = retry
        {
            tokio::time::sleep(retry.backoff * attempt).await;
        }
        let outgoing_body: Body = match body.take() {
            Some(body) if !bodiless => body.boxed(),
            _ => Empty::new().map_err(|never| match never {}).boxed(),
        };
        let Some(backend) = rule.backend(fastrand::u64(..)) else {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                "nodemesh: every backend of the matched rule has weight 0\n".into(),
            );
        };
        let mut outgoing = Request::new(outgoing_body);
        *outgoing.method_mut() = parts.method.clone();
        *outgoing.headers_mut() = parts.headers.clone();
        reached.backend = Some(backend.service.clone());
        let this_attempt = Attempt {
            backend,
            version,
            authority: &authority,
            path: &path,
            timeout: rule.backend_timeout,
        };
        let response = send_to_backend(connection, &this_attempt, outgoing, reached).await;
        let retryable = match &response {
            Ok(r) => retry.is_some_and(|retry| retry.codes.contains(&r.status().as_u16())),
            // The proxy's own 503 (no endpoint answered), or a status the policy lists.
            Err(refusal) => retry.is_some_and(|retry| {
                refusal.status == StatusCode::SERVICE_UNAVAILABLE
                    || retry.codes.contains(&refusal.status.as_u16())
            }),
        };
        if retryable && attempt + 1 < attempts {
            tracing::debug!(attempt, backend = %backend.service, "retrying");
            last = Some(response);
            continue;
        }
        return match response {
            Ok(mut upstream) => {
                if upgrade && upstream.status() == StatusCode::SWITCHING_PROTOCOLS {
                    bridge_upgrade(
                        downstream_upgrade,
                        hyper::upgrade::on(&mut upstream),
                        std::future::pending(),
                    );
                } else {
                    hop::strip_hop_by_hop(upstream.headers_mut(), false);
                }
                upstream
            }
            Err(refusal) => refusal.into_response(),
        };
    }
    match last {
        Some(Ok(upstream)) => upstream,
        Some(Err(refusal)) => refusal.into_response(),
        None => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "nodemesh: no attempt made\n".into(),
        ),
    }
}

/// Where and how one attempt of a request goes.
struct Attempt<'a> {
    backend: &'a Backend,
    version: Version,
    /// What the client addressed (after any rewrite), for Host / `:authority`.
    authority: &'a str,
    path: &'a str,
    /// `timeouts.backendRequest`.
    timeout: Option<Duration>,
}

/// Sends one attempt to an endpoint of its backend, recording the endpoint and its zone in
/// `reached`. Err is what the proxy answers instead.
async fn send_to_backend(
    connection: &ClientConnection,
    attempt: &Attempt<'_>,
    mut request: Request<Body>,
    reached: &mut Reached,
) -> Result<Response<Body>, Refusal> {
    let Attempt {
        backend,
        version,
        authority,
        path,
        timeout,
    } = *attempt;
    let ctx = &connection.ctx;
    address(&mut request, version, authority, path)?;
    let picked = {
        let services = ctx.services.read().unwrap_or_else(|p| p.into_inner());
        let ipv4 = connection.original.is_ipv4();
        services
            .candidates(&backend.service, backend.port, ipv4)
            .and_then(|candidates| {
                let draws = (fastrand::u64(..), fastrand::u64(..));
                // A retry avoids the endpoint the previous attempt went to, while there is
                // another (Envoy's `previous_hosts`).
                let avoid = reached.endpoint;
                let (index, placement) = ctx.http.balancer.pick(&candidates, draws, avoid)?;
                let zones = services.zones_to(candidates.zone(index));
                Some((candidates.endpoints[index], placement, zones))
            })
    };
    let Some((endpoint, placement, zones)) = picked else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "nodemesh: no ready endpoint for {}:{}\n",
                backend.service, backend.port
            ),
        ));
    };
    if let Placement::Spilled(reason) = placement {
        ctx.metrics.zone_spill(&backend.service, reason.as_str());
    }
    // Bytes by zone: the bodies both ways, counted as they pass.
    let zones = zones.map(|zones| connection.zone_series(&zones));
    let zone_bytes = zones.as_ref().map(|series| series.bytes.clone());
    if let Some(counter) = &zone_bytes {
        let counter = counter.clone();
        request = request.map(|body| body.map_frame(count_into(counter)).boxed());
    }
    reached.zones = zones;
    reached.endpoint = Some(endpoint);
    // Counted in flight until settled, or taken back if this future is dropped first.
    let in_flight = InFlight::new(Arc::clone(&ctx.http.balancer), endpoint);
    let pod = Arc::clone(&connection.pod);
    let sending = ctx.http.upstreams.send(
        connection.pod.sockets.cookie(),
        endpoint,
        version,
        request,
        || ctx.dial_pooled(&pod, endpoint),
    );
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, sending).await {
            Ok(result) => result,
            Err(_) => {
                in_flight.finish(Outcome::Failure);
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("nodemesh: backend request timeout ({limit:?}) from {endpoint}\n"),
                ));
            }
        },
        None => sending.await,
    };
    let response = settle(connection, in_flight, result)?;
    Ok(match zone_bytes {
        Some(counter) => response.map(|body| body.map_frame(count_into(counter)).boxed()),
        None => response.map(BodyExt::boxed),
    })
}

/// A frame mapper that adds each data frame's length to `counter`.
fn count_into(
    counter: prometheus_client::metrics::counter::Counter,
) -> impl FnMut(hyper::body::Frame<hyper::body::Bytes>) -> hyper::body::Frame<hyper::body::Bytes>
+ Send
+ Sync
+ 'static {
    move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    }
}

/// Rewrites the request for the upstream: its URI's form, Host, and HTTP version.
fn address(
    request: &mut Request<Body>,
    version: Version,
    authority: &str,
    path: &str,
) -> Result<(), Refusal> {
    *request.uri_mut() = upstream_uri(version, authority, path)
        .map_err(|error| Refusal::new(StatusCode::BAD_REQUEST, error.to_string()))?;
    if version == Version::Http1 {
        if let Ok(host) = HeaderValue::from_str(authority) {
            request.headers_mut().insert(header::HOST, host);
        }
    } else {
        request.headers_mut().remove(header::HOST);
    }
    *request.version_mut() = match version {
        Version::Http1 => HttpVersion::HTTP_11,
        Version::Http2 => HttpVersion::HTTP_2,
    };
    Ok(())
}

/// Tells the balancer how the request in flight went, and turns a failure into the answer
/// the client gets.
fn settle(
    connection: &ClientConnection,
    in_flight: InFlight,
    result: Result<Response<Incoming>, UpstreamError>,
) -> Result<Response<Incoming>, Refusal> {
    let endpoint = in_flight.endpoint();
    match result {
        Ok(response) => {
            let outcome = if response.status().is_server_error() {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            in_flight.finish(outcome);
            Ok(response)
        }
        Err(UpstreamError::Dial(
            DialError::Hbone(HboneError::Refused {
                status: StatusCode::FORBIDDEN,
                ..
            })
            | DialError::ThisNode(admission::Refusal::Denied(_)),
        )) => {
            // The destination's authorization policy, not the endpoint's health.
            in_flight.finish(Outcome::Success);
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "nodemesh: {endpoint} refused the connection from {}: denied by its authorization policy\n",
                    connection.pod.display_name
                ),
            ))
        }
        Err(error) => {
            in_flight.finish(Outcome::Failure);
            tracing::info!(pod = %connection.pod.display_name, %endpoint, %error, "upstream request failed");
            let status = match error {
                UpstreamError::Dial(_) | UpstreamError::Handshake(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                UpstreamError::Request(_) => StatusCode::BAD_GATEWAY,
            };
            Err(Refusal::new(
                status,
                format!("nodemesh: upstream {endpoint} failed: {error}\n"),
            ))
        }
    }
}

/// HTTP/1.1 carries the origin form (`/path?query`, Host separately); HTTP/2 the absolute
/// form, from which hyper takes `:scheme` and `:authority`.
fn upstream_uri(version: Version, authority: &str, path: &str) -> Result<Uri, UpstreamUriError> {
    let path = PathAndQuery::try_from(path).map_err(UpstreamUriError::Path)?;
    match version {
        Version::Http1 => Ok(Uri::from(path)),
        Version::Http2 => {
            let authority =
                Authority::try_from(authority).map_err(|source| UpstreamUriError::Authority {
                    authority: authority.to_owned(),
                    source,
                })?;
            Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(UpstreamUriError::Build)
        }
    }
}

/// Why a request cannot be sent upstream as it is; its text is the 400 answer's body.
#[derive(Debug, thiserror::Error)]
enum UpstreamUriError {
    #[error("nodemesh: bad path: {0}\n")]
    Path(hyper::http::uri::InvalidUri),
    #[error("nodemesh: bad authority {authority:?}: {source}\n")]
    Authority {
        authority: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error("nodemesh: {0}\n")]
    Build(hyper::http::Error),
}

/// What the client addressed: the URI's authority (HTTP/2), the Host header (HTTP/1.1), or
/// the Service address it dialled.
fn request_authority(uri: &Uri, headers: &HeaderMap, original: SocketAddr) -> String {
    uri.authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| original.to_string())
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn is_bodiless(headers: &HeaderMap, body: &Incoming) -> bool {
    use hyper::body::Body as _;
    body.is_end_stream()
        || (headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v == "0")
            && !headers.contains_key(header::TRANSFER_ENCODING))
}

fn redirect_response(
    request: &Request<Incoming>,
    matcher: Option<&RequestMatch>,
    redirect: &crate::state::routes::Redirect,
    original: SocketAddr,
) -> Response<Body> {
    let authority = request_authority(request.uri(), request.headers(), original);
    let (host, port) = match Authority::try_from(authority.as_str()) {
        Ok(parsed) => (parsed.host().to_owned(), parsed.port_u16()),
        Err(_) => (authority, None),
    };
    let scheme = redirect.scheme.clone().unwrap_or_else(|| "http".into());
    let host = redirect.hostname.clone().unwrap_or(host);
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = redirect
        .port
        .or(if redirect.scheme.is_some() {
            None
        } else {
            port
        })
        .filter(|p| *p != default_port);
    let path = match (&redirect.path, matcher) {
        (Some(modifier), Some(matcher)) => matcher.rewrite_path(modifier, request.uri().path()),
        _ => request.uri().path().to_owned(),
    };
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let mut response = answer(
        StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND),
        String::new(),
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// What the proxy answers instead of an upstream response.
pub struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Self {
        Self { status, message }
    }

    fn into_response(self) -> Response<Body> {
        answer(self.status, self.message)
    }
}
