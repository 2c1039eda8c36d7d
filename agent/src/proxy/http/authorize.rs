//! L7 authorization at the destination: an HBONE stream to a workload whose
//! AuthorizationPolicies look at HTTP methods or paths is parsed as HTTP, and each request
//! is decided on (source identity, port, method, path) before it reaches the application;
//! a denied request gets 403 with a body that says so, and the connection stays usable.
//! A stream that turns out not to be HTTP is decided with its HTTP attributes unknown
//! (`state::authorization` explains what that means) and relayed or refused as a whole.

use std::{sync::Arc, time::Duration};

use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};

use super::{
    Body,
    detect::{self, Prefixed, Protocol},
    request::{answer, bridge_upgrade},
};
use crate::{
    identity::spiffe::SpiffeId,
    proxy::{
        counting::{Meter, MeteredStream},
        relay::{relay, reset},
    },
    state::authorization::{Decision, Policy, RequestAttributes, decide},
    telemetry::{
        access::{AccessLog, RequestRecord},
        metrics::{Metrics, Traffic},
        report::ConnectionReport,
    },
};

/// Who is asking what, for every request on one stream.
pub struct Check {
    pub pod: String,
    pub policies: Vec<Arc<Policy>>,
    pub peer: SpiffeId,
    pub port: u16,
    pub detect_wait: Duration,
    /// The stream's labels, reported by the destination.
    pub traffic: Traffic,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
}

impl Check {
    fn decide(&self, http: Option<(&str, &str)>) -> Decision {
        decide(
            &self.policies,
            &RequestAttributes {
                source: Some(&self.peer),
                port: self.port,
                http,
            },
        )
    }
}

/// Serves `tunnel` towards `app` under `check`; returns the bytes read from and written to
/// the tunnel.
pub async fn serve<T>(mut tunnel: T, app: TcpStream, check: Check) -> (u64, u64)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let detected = match detect::detect(&mut tunnel, Some(check.detect_wait)).await {
        Ok(detected) => detected,
        Err(_) => return (0, 0),
    };
    let meter = Arc::new(Meter::default());
    let stream = MeteredStream::new(Prefixed::new(detected.prefix, tunnel), Arc::clone(&meter));
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
                let (sent, received) = relay(stream, app, |_, app| reset(app)).await;
                report.close(sent, received);
            }
            Decision::Deny(by) => {
                tracing::warn!(pod = %check.pod, peer = %check.peer, port = check.port, policy = %by, "authorization: non-HTTP stream denied");
                reset(&app);
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
    let pod = check.pod.clone();
    let handler = move |request| {
        let (sender, check) = (Arc::clone(&sender), Arc::clone(&check));
        async move { authorize(request, &sender, &check).await }
    };
    if let Err(error) = super::serve_requests(stream, protocol, handler).await {
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
    let protocol = super::request::protocol_of(request.headers());
    let trace_id = super::trace::trace_id_of(request.headers());
    let response = decide_and_forward(request, sender, check, &method, &path).await;
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
    path: &str,
) -> Response<Body> {
    if let Decision::Deny(by) = check.decide(Some((method, path))) {
        tracing::warn!(pod = %check.pod, peer = %check.peer, port = check.port, %method, %path, policy = %by, "authorization: request denied");
        return answer(
            StatusCode::FORBIDDEN,
            format!(
                "nodemesh: {method} {path} denied to {} by authorization policy\n",
                check.peer
            ),
        );
    }
    let downstream_upgrade = request
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let request = request.map(|body| body.boxed());
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
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                bridge_upgrade(downstream_upgrade, hyper::upgrade::on(&mut response));
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
