//! HTTP(S) servers that anyone who can reach the port may connect to before proving who they
//! are (the CA's port 15012, the agent's `/metrics` listener), served within bounds so that a
//! flood of idle or slow clients costs bounded memory and leaves other clients served:
//! - connections at once, per source and in all ([`PerClient`]): one over either bound is
//!   reset at once (IPv6 sources count per /64, which one host commonly holds whole);
//! - the TLS handshake must complete within `handshake_timeout`;
//! - a request head must arrive within `header_read_timeout`, counted from when the server
//!   starts waiting for it, so a connection that never sends one, sends it slowly, or idles
//!   between keep-alive requests is closed (hyper's own timeout, which hyper silently
//!   disables unless it is given a timer, as it was not before);
//! - hyper buffers at most [`MAX_BUFFER`] of a connection's input;
//! - a connection lives at most `max_lifetime`; then its request in flight is finished and
//!   it is closed (a client that stops reading a response holds its slot no longer);
//! - accept errors (EMFILE when file descriptors run out) pause the accept loop, 10 ms
//!   doubling to 1 s, instead of retrying in a busy loop that would take a core.
//!
//! Refusals, timeouts and accept errors are logged at most once per 10 s each.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, body::Incoming, service::Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::bounds::{LogThrottle, PerClient, per_host};

/// The most of a connection's input hyper holds: a request head (a CA request's bearer
/// token is about 1 KiB) and a chunk of body.
pub const MAX_BUFFER: usize = 16 * 1024;
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// How long a connection at the end of its lifetime has to finish its request in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The bounds of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_lifetime: Duration,
}

/// The services' response type.
pub type HttpResponse = Response<Full<Bytes>>;

/// One server: its name in logs, its bounds, and TLS if it speaks HTTPS.
pub struct BoundedServer {
    name: &'static str,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    connections: Arc<PerClient<IpAddr>>,
    refusals_logged: LogThrottle,
    accept_errors_logged: LogThrottle,
    timeouts_logged: Arc<LogThrottle>,
}

impl BoundedServer {
    pub fn new(name: &'static str, limits: Limits, tls: Option<TlsAcceptor>) -> Self {
        Self {
            name,
            limits,
            tls,
            connections: PerClient::new(
                name,
                limits.max_connections_per_source,
                limits.max_connections,
            ),
            refusals_logged: LogThrottle::default(),
            accept_errors_logged: LogThrottle::default(),
            timeouts_logged: Arc::default(),
        }
    }

    /// Accepts connections on `listener` until the task running it is dropped, serving each
    /// with the service `service_for(client address)` makes.
    pub async fn serve<F, S>(self, listener: TcpListener, service_for: F)
    where
        F: Fn(SocketAddr) -> S,
        S: Service<Request<Incoming>, Response = HttpResponse, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let mut pause = ACCEPT_PAUSE_MIN;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    pause = ACCEPT_PAUSE_MIN;
                    accepted
                }
                // The connection failed before it was accepted; the next one is unaffected.
                Err(error) if is_per_connection(&error) => continue,
                Err(error) => {
                    if self.accept_errors_logged.ready() {
                        tracing::warn!(server = self.name, %error, ?pause, "accepting a connection failed (out of file descriptors?); pausing before the next try (logged at most every 10 s)");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                    continue;
                }
            };
            let Some(slot) = self.connections.try_acquire(&per_host(peer.ip())) else {
                self.refuse(&stream, peer);
                continue;
            };
            let service = service_for(peer);
            let (limits, tls, timeouts_logged) = (
                self.limits,
                self.tls.clone(),
                Arc::clone(&self.timeouts_logged),
            );
            let name = self.name;
            tokio::spawn(async move {
                let _slot = slot;
                let Some(tls) = tls else {
                    return serve_http(stream, service, &limits).await;
                };
                match tokio::time::timeout(limits.handshake_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_http(stream, service, &limits).await,
                    Ok(Err(error)) => {
                        tracing::debug!(server = name, %peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        if timeouts_logged.ready() {
                            tracing::info!(server = name, %peer, timeout = ?limits.handshake_timeout, "TLS handshake not completed in time; closed (logged at most every 10 s)");
                        }
                    }
                }
            });
        }
    }

    fn refuse(&self, stream: &TcpStream, peer: SocketAddr) {
        if self.refusals_logged.ready() {
            tracing::warn!(
                server = self.name,
                %peer,
                per_source = self.limits.max_connections_per_source,
                total = self.limits.max_connections,
                "connection reset: its source, or the server, is at its bound of connections (logged at most every 10 s)"
            );
        }
        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    }
}

/// Errors of one pending connection (Linux reports them from accept), not of the listener.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted
    )
}

async fn serve_http<IO, S>(io: IO, service: S, limits: &Limits)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = HttpResponse, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUFFER)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = tokio::time::sleep(limits.max_lifetime) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
}

#[cfg(test)]
mod tests;
