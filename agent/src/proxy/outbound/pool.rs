//! Connections from the proxy to endpoints, for HTTP: pooled per (source pod, endpoint,
//! protocol), each made by `OutboundContext::dial_pooled`: HBONE to meshed pods of other
//! nodes, a socket pair into the inbound side's admission for meshed pods of this node,
//! plain TCP from the pod's network namespace otherwise.
//!
//! HTTP/2 multiplexes every request to an endpoint over one connection. HTTP/1.1 keeps idle
//! keep-alive connections (at most `MAX_IDLE_H1` per endpoint): a connection goes back to the
//! pool once its response body has been read, and one the server closed meanwhile is
//! detected before use; a request that found its connection closed before it was written is
//! sent again on a new connection, so servers closing idle connections do not cause errors.
//!
//! A connection that travels in an HBONE tunnel is not reused once the HTTP/2 connection
//! carrying the tunnel takes no new streams (the destination's agent is draining after an
//! upgrade): the next request opens a new tunnel, to the successor, and the old connection
//! closes, so the draining agent's tunnels end instead of living on as idle keep-alives.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::upstream::{DialError, Upstream};
use crate::proxy::{hbone::client::Carrier, http::Body};

const MAX_IDLE_H1: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting: {0}")]
    Dial(#[from] DialError),
    #[error("HTTP handshake: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Request(hyper::Error),
}

type Key = (u64, SocketAddr);

/// A pooled connection and the HBONE connection it travels in, if any.
struct Pooled<S> {
    sender: S,
    carrier: Option<Carrier>,
}

impl<S> Pooled<S> {
    fn carrier_open(&self) -> bool {
        self.carrier.as_ref().is_none_or(|c| !c.closing())
    }
}

/// Idle HTTP/1.1 connections by pod and endpoint.
type IdleH1 = HashMap<Key, Vec<Pooled<http1::SendRequest<Body>>>>;

#[derive(Default)]
pub struct UpstreamPool {
    /// Shared with the tasks that return connections to it.
    h1: Arc<Mutex<IdleH1>>,
    h2: Mutex<HashMap<Key, Pooled<http2::SendRequest<Body>>>>,
}

impl UpstreamPool {
    /// Sends `request` to `endpoint` for the pod whose network namespace cookie is `pod`,
    /// dialling with `dial` when no pooled connection is usable.
    pub async fn send<D, F>(
        &self,
        pod: u64,
        endpoint: SocketAddr,
        version: Version,
        request: Request<Body>,
        dial: D,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Upstream, DialError>>,
    {
        let key = (pod, endpoint);
        match version {
            Version::Http2 => {
                let mut sender = match self.pooled_h2(&key) {
                    Some(sender) => sender,
                    None => {
                        let upstream = dial().await?;
                        let carrier = upstream.carrier();
                        let io = TokioIo::new(upstream);
                        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                            .handshake(io)
                            .await
                            .map_err(UpstreamError::Handshake)?;
                        tokio::spawn(async move {
                            if let Err(error) = connection.await {
                                tracing::debug!(%endpoint, %error, "upstream HTTP/2 connection ended");
                            }
                        });
                        let pooled = Pooled {
                            sender: sender.clone(),
                            carrier,
                        };
                        lock(&self.h2).insert(key, pooled);
                        sender
                    }
                };
                sender
                    .send_request(request)
                    .await
                    .map_err(UpstreamError::Request)
            }
            Version::Http1 => {
                let mut request = request;
                // A pooled connection first; if the server had closed it before the request
                // was written, the request comes back and goes out on a new connection.
                if let Some(mut pooled) = self.pooled_h1(&key) {
                    match pooled.sender.try_send_request(request).await {
                        Ok(response) => {
                            self.recycle_h1(key, pooled);
                            return Ok(response);
                        }
                        Err(mut failed) => match failed.take_message() {
                            Some(unsent) => request = unsent,
                            None => return Err(UpstreamError::Request(failed.into_error())),
                        },
                    }
                }
                let upstream = dial().await?;
                let carrier = upstream.carrier();
                let io = TokioIo::new(upstream);
                let (mut sender, connection) = http1::handshake(io)
                    .await
                    .map_err(UpstreamError::Handshake)?;
                tokio::spawn(async move {
                    if let Err(error) = connection.with_upgrades().await {
                        tracing::debug!(%endpoint, %error, "upstream HTTP/1.1 connection ended");
                    }
                });
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(UpstreamError::Request)?;
                self.recycle_h1(key, Pooled { sender, carrier });
                Ok(response)
            }
        }
    }

    fn pooled_h2(&self, key: &Key) -> Option<http2::SendRequest<Body>> {
        let mut pool = lock(&self.h2);
        match pool.get(key) {
            Some(pooled) if !pooled.sender.is_closed() && pooled.carrier_open() => {
                Some(pooled.sender.clone())
            }
            Some(_) => {
                pool.remove(key);
                None
            }
            None => None,
        }
    }

    fn pooled_h1(&self, key: &Key) -> Option<Pooled<http1::SendRequest<Body>>> {
        let mut pool = lock(&self.h1);
        let idle = pool.get_mut(key)?;
        while let Some(pooled) = idle.pop() {
            if pooled.sender.is_ready() && pooled.carrier_open() {
                return Some(pooled);
            }
        }
        None
    }

    /// Returns `sender` to the pool once its connection can take another request (after the
    /// response body has been read; never, for an upgraded or closed connection).
    fn recycle_h1(&self, key: Key, mut pooled: Pooled<http1::SendRequest<Body>>) {
        let pool = Arc::clone(&self.h1);
        tokio::spawn(async move {
            if pooled.sender.ready().await.is_ok() && pooled.carrier_open() {
                let mut idle = lock(&pool);
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE_H1 {
                    list.push(pooled);
                }
            }
        });
    }

    /// Forgets idle connections to endpoints `live` rejects.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        lock(&self.h1).retain(|(_, endpoint), _| live(endpoint));
        lock(&self.h2).retain(|(_, endpoint), _| live(endpoint));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
