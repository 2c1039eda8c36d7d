//! HBONE client: a captured connection to a meshed pod travels as an HTTP/2 CONNECT stream
//! (`:authority` = original `ip:port`) inside mutual TLS to the destination pod's HBONE
//! listener (port 15008), as Istio ambient defines it. Streams share pooled connections per
//! (source pod, source identity, destination HBONE address), renewed when the source
//! certificate is.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
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

pub type Tunnel = TokioIo<Upgraded>;

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
        let mut sender = match self.pooled(&key, &certificate) {
            Some(sender) => sender,
            None => {
                let sender = self
                    .connect(source, &certificate, destination, addr, mark, timeout)
                    .await?;
                self.lock()
                    .insert(key, (Arc::clone(&certificate), sender.clone()));
                sender
            }
        };
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|_| HboneError::Refused {
                addr,
                target,
                status: StatusCode::BAD_REQUEST,
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| HboneError::Http { addr, source })?;
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
        Ok(TokioIo::new(upgraded))
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
