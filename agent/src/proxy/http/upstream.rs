//! Connections from the proxy to endpoints, for HTTP: pooled per (source pod, endpoint,
//! protocol), each made the way the source pod's L4 traffic is (HBONE to meshed pods, plain
//! TCP from the pod's network namespace otherwise).
//!
//! HTTP/2 multiplexes every request to an endpoint over one connection. HTTP/1.1 keeps idle
//! keep-alive connections (at most `MAX_IDLE_H1` per endpoint): a connection goes back to the
//! pool once its response body has been read, and one the server closed meanwhile is
//! detected before use; a request that found its connection closed before it was written is
//! sent again on a new connection, so servers closing idle connections do not cause errors.

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

use super::Body;
use crate::proxy::outbound::{DialError, Upstream};

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

#[derive(Default)]
pub struct UpstreamPool {
    /// Shared with the tasks that return connections to it.
    h1: Arc<Mutex<HashMap<Key, Vec<http1::SendRequest<Body>>>>>,
    h2: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
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
                        let io = TokioIo::new(dial().await?);
                        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                            .handshake(io)
                            .await
                            .map_err(UpstreamError::Handshake)?;
                        tokio::spawn(async move {
                            if let Err(error) = connection.await {
                                tracing::debug!(%endpoint, %error, "upstream HTTP/2 connection ended");
                            }
                        });
                        lock(&self.h2).insert(key, sender.clone());
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
                if let Some(mut sender) = self.pooled_h1(&key) {
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            self.recycle_h1(key, sender);
                            return Ok(response);
                        }
                        Err(mut failed) => match failed.take_message() {
                            Some(unsent) => request = unsent,
                            None => return Err(UpstreamError::Request(failed.into_error())),
                        },
                    }
                }
                let io = TokioIo::new(dial().await?);
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
                self.recycle_h1(key, sender);
                Ok(response)
            }
        }
    }

    fn pooled_h2(&self, key: &Key) -> Option<http2::SendRequest<Body>> {
        let mut pool = lock(&self.h2);
        match pool.get(key) {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                pool.remove(key);
                None
            }
            None => None,
        }
    }

    fn pooled_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut pool = lock(&self.h1);
        let idle = pool.get_mut(key)?;
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Returns `sender` to the pool once its connection can take another request (after the
    /// response body has been read; never, for an upgraded or closed connection).
    fn recycle_h1(&self, key: Key, mut sender: http1::SendRequest<Body>) {
        let pool = Arc::clone(&self.h1);
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = lock(&pool);
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE_H1 {
                    list.push(sender);
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
