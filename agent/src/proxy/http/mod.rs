//! HTTP as both sides of the proxy serve it: the body type, the limits every served
//! connection gets (`serve_requests`), the answers the proxy makes itself, and hop-by-hop
//! headers and upgrades (`hop`).

pub mod hop;

use std::{convert::Infallible, time::Duration};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::detect::Protocol;
use crate::lifecycle::drain::Drain;

/// Every HTTP body the proxy sends or forwards.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head accepted (request line and headers); larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A client must finish sending a request head within this time (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per client connection.
pub const MAX_STREAMS: u32 = 1024;

/// Runs `handle` for every request on `stream`, HTTP/2 or HTTP/1.1 (with upgrades), under
/// the proxy's limits: head size, head read timeout (slowloris), concurrent streams. Both
/// the outbound L7 proxy and authorization at the destination serve clients with it.
pub async fn serve_requests<S, F, Fut>(
    stream: S,
    protocol: Protocol,
    drain: &Drain,
    handle: F,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let service = service_fn(move |request| {
        let response = handle(request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let io = TokioIo::new(stream);
    // A draining agent finishes the requests in flight and lets clients move on: HTTP/2
    // gets GOAWAY, HTTP/1.1 is closed after the response in flight (at once when idle).
    match protocol {
        Protocol::Http2 => {
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .serve_connection(io, service);
            drain
                .serve_until_drained(connection, |c| c.graceful_shutdown())
                .await
        }
        _ => {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                // A client that shuts down its write side after its request still gets the
                // response (`printf … | nc` does that).
                .half_close(true)
                .serve_connection(io, service)
                .with_upgrades();
            drain
                .serve_until_drained(connection, |c| c.graceful_shutdown())
                .await
        }
    }
}

/// `grpc` for gRPC requests, `http` for the rest (Istio's `request_protocol`).
pub fn protocol_of(headers: &HeaderMap) -> &'static str {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc { "grpc" } else { "http" }
}

/// A response the proxy makes itself, with a plain-text body that says why.
pub fn answer(status: StatusCode, message: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(message))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
