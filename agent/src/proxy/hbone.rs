//! HBONE client: a captured connection to a meshed pod travels as an HTTP/2 CONNECT stream
//! (`:authority` = original `ip:port`) inside mutual TLS to the destination pod's HBONE
//! listener (port 15008), as Istio ambient defines it. Streams share pooled connections per
//! (source pod, source identity, destination HBONE address), renewed when the source
//! certificate is.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::Empty;
use hyper::{
    Method, Request, StatusCode, body::Bytes, client::conn::http2::SendRequest, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{
    dial::{connect_within, pod_socket},
    outbound::SourcePod,
};
use crate::{
    identity::{
        manager::{IdentityManager, WorkloadCertificate},
        spiffe::SpiffeId,
        tls::{self, TlsError},
    },
    pods::netns::NetnsError,
};

pub use nodemesh_common::HBONE_PORT;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("source {0} holds no certificate yet; refusing to send mesh traffic in the clear")]
    NoCertificate(SpiffeId),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("creating the HBONE socket: {0}")]
    Socket(#[from] NetnsError),
    #[error(
        "connecting to HBONE {addr}: {source} (is port {HBONE_PORT} reachable, or a NetworkPolicy blocking it?)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to HBONE {addr}: no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("mTLS with {addr} (expected {expected}): {source}")]
    Handshake {
        addr: SocketAddr,
        expected: SpiffeId,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("CONNECT {target} refused by {addr}: {status}")]
    Refused {
        addr: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
}

/// Shared by all outbound connections of the node.
pub struct HboneClient {
    pub identities: Arc<IdentityManager>,
    pub roots: Arc<RootCertStore>,
    pool: Mutex<Pool>,
}

/// One CONNECT stream, and the HTTP/2 connection that carries it.
pub struct Tunnel {
    io: TokioIo<Upgraded>,
    carrier: Carrier,
}

impl Tunnel {
    pub fn carrier(&self) -> Carrier {
        self.carrier.clone()
    }
}

/// The HTTP/2 connection a tunnel travels in.
#[derive(Clone)]
pub struct Carrier(SendRequest<Empty<Bytes>>);

impl Carrier {
    /// Whether the connection takes no new streams any more (its peer sent GOAWAY, as a
    /// draining agent does, or it failed). Its tunnels still work; whoever keeps one for
    /// reuse should let it go, so that the draining agent's connections can end.
    pub fn closing(&self) -> bool {
        self.0.is_closed()
    }
}

impl tokio::io::AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Pooled HTTP/2 connections by (source pod, source identity, HBONE address), with the
/// certificate each was made with. The source pod (its network namespace cookie) is part of
/// the key because the connection leaves from that pod's address: the destination delivers
/// with it as the source, and NetworkPolicies see it.
type PoolKey = (u64, SpiffeId, SocketAddr);
type Pool = HashMap<PoolKey, (Arc<WorkloadCertificate>, SendRequest<Empty<Bytes>>)>;

impl HboneClient {
    pub fn new(identities: Arc<IdentityManager>, roots: Arc<RootCertStore>) -> Self {
        Self {
            identities,
            roots,
            pool: Mutex::default(),
        }
    }

    /// Opens a CONNECT tunnel from `source` to `target`, a pod holding `destination`.
    pub async fn open(
        &self,
        source: &SourcePod,
        source_id: &SpiffeId,
        destination: &SpiffeId,
        target: SocketAddr,
        mark: u32,
        timeout: Duration,
    ) -> Result<Tunnel, HboneError> {
        let certificate = self
            .identities
            .certificate(source_id)
            .ok_or_else(|| HboneError::NoCertificate(source_id.clone()))?;
        let addr = SocketAddr::new(target.ip(), HBONE_PORT);
        let key = (source.sockets.cookie(), source_id.clone(), addr);
        let connect_request = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(|_| HboneError::Refused {
                    addr,
                    target,
                    status: StatusCode::BAD_REQUEST,
                })
        };
        let pooled = self.pooled(&key, &certificate);
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(sender) => sender,
            None => {
                self.fresh(
                    key.clone(),
                    &certificate,
                    source,
                    destination,
                    mark,
                    timeout,
                )
                .await?
            }
        };
        let response = match sender.send_request(connect_request()?).await {
            Ok(response) => response,
            // A pooled connection whose peer has just sent GOAWAY (a draining agent) or
            // died: the stream was never processed, so it goes out on a new connection.
            Err(error) if reused => {
                tracing::debug!(%addr, %error, "pooled HBONE connection took no new stream; opening a new one");
                self.lock().remove(&key);
                sender = self
                    .fresh(key, &certificate, source, destination, mark, timeout)
                    .await?;
                sender
                    .send_request(connect_request()?)
                    .await
                    .map_err(|source| HboneError::Http { addr, source })?
            }
            Err(source) => return Err(HboneError::Http { addr, source }),
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                addr,
                target,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| HboneError::Http { addr, source })?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            carrier: Carrier(sender),
        })
    }

    /// A new pooled connection for `key`.
    async fn fresh(
        &self,
        key: PoolKey,
        certificate: &Arc<WorkloadCertificate>,
        source: &SourcePod,
        destination: &SpiffeId,
        mark: u32,
        timeout: Duration,
    ) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
        let sender = self
            .connect(source, certificate, destination, key.2, mark, timeout)
            .await?;
        self.lock()
            .insert(key, (Arc::clone(certificate), sender.clone()));
        Ok(sender)
    }

    /// A live pooled connection made with the current certificate.
    fn pooled(
        &self,
        key: &PoolKey,
        certificate: &Arc<WorkloadCertificate>,
    ) -> Option<SendRequest<Empty<Bytes>>> {
        let mut pool = self.lock();
        match pool.get(key) {
            Some((used, sender)) if Arc::ptr_eq(used, certificate) && !sender.is_closed() => {
                Some(sender.clone())
            }
            Some(_) => {
                // Closed, or made with a certificate that has since been renewed.
                pool.remove(key);
                None
            }
            None => None,
        }
    }

    async fn connect(
        &self,
        source: &SourcePod,
        certificate: &WorkloadCertificate,
        destination: &SpiffeId,
        addr: SocketAddr,
        mark: u32,
        timeout: Duration,
    ) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
        let socket = pod_socket(&source.sockets, addr, mark)?;
        let tcp = connect_within(socket, addr, timeout)
            .await
            .map_err(|_| HboneError::Timeout { addr, timeout })?
            .map_err(|source| HboneError::Connect { addr, source })?;
        let (chain, key) = certificate.tls_material()?;
        let config =
            tls::hbone_client_config(chain, key, Arc::clone(&self.roots), destination.clone())?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| HboneError::Handshake {
                addr,
                expected: destination.clone(),
                source,
            })?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|source| HboneError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "HBONE connection closed");
            }
        });
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
