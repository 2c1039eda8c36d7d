//! HBONE client: a captured connection to a meshed pod travels as an HTTP/2 CONNECT stream
//! inside mutual TLS to the destination pod's HBONE listener. Streams share pooled
//! connections per (source pod, source identity, destination HBONE address), renewed when
//! the source certificate is.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, StatusCode};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{
    CLIENT_CONNECTION_WINDOW, CLIENT_SEND_BUFFER, CLIENT_STREAM_WINDOW, HBONE_PORT,
    MAX_HEADER_LIST, RESET_STREAMS_KEPT, error::HboneError, stream::TunnelStream,
};
use crate::{
    identity::{
        manager::{IdentityManager, WorkloadCertificate},
        spiffe::SpiffeId,
        tls,
    },
    netns::NetnsSockets,
    proxy::{
        dial::{connect_within, pod_socket},
        relay::Relayable,
    },
};

/// Shared by all outbound connections of the node.
pub struct HboneClient {
    pub identities: Arc<IdentityManager>,
    pub roots: Arc<RootCertStore>,
    pool: Mutex<Pool>,
    /// One lock per pool key, held while a connection for it is being made: concurrent
    /// tunnels wait for that connection instead of each opening its own (a burst would
    /// otherwise start a burst of TLS handshakes at the destination).
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// One CONNECT stream, and the HTTP/2 connection that carries it.
pub struct Tunnel {
    io: TunnelStream,
    carrier: Carrier,
    _stream: StreamCount,
}

/// Counts a tunnel against its pooled connection while it lives.
struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    fn take(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(streams))
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tunnel {
    pub fn carrier(&self) -> Carrier {
        self.carrier.clone()
    }
}

/// The HTTP/2 connection a tunnel travels in.
#[derive(Clone)]
pub struct Carrier(SendRequest<Bytes>);

impl Carrier {
    /// Whether the connection takes no new streams any more (its peer sent GOAWAY, as a
    /// draining agent does, or it failed). Its tunnels still work; whoever keeps one for
    /// reuse should let it go, so that the draining agent's connections can end.
    pub fn closing(&self) -> bool {
        takes_no_streams(&self.0)
    }
}

/// Whether h2 would refuse a new stream on this connection: it refuses once a GOAWAY came
/// or the connection failed. (A clone's readiness, polled without a task to wake: a clone
/// has no stream of its own waiting to open, so it is ready unless the connection refuses.)
fn takes_no_streams(sender: &SendRequest<Bytes>) -> bool {
    let mut probe = sender.clone();
    matches!(
        probe.poll_ready(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Err(_))
    )
}

impl Relayable for Tunnel {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.poll_readable(cx)
    }

    fn abort(&mut self) {
        self.io.abort();
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
type Pool = HashMap<PoolKey, Vec<Pooled>>;

/// Tunnels one pooled connection carries at once; beyond, another connection is opened.
/// (A connection's streams share one TCP window and one TLS session; the HBONE server
/// allows `HBONE_SERVER_MAX_STREAMS` on each.)
const MAX_STREAMS_PER_CONNECTION: usize = 100;

/// One pooled connection, the certificate it was made with, and its open tunnels.
#[derive(Clone)]
struct Pooled {
    certificate: Arc<WorkloadCertificate>,
    sender: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
}

impl HboneClient {
    pub fn new(identities: Arc<IdentityManager>, roots: Arc<RootCertStore>) -> Self {
        Self {
            identities,
            roots,
            pool: Mutex::default(),
            connecting: Mutex::default(),
        }
    }

    /// Opens a CONNECT tunnel from the pod whose network namespace `source` is to `target`,
    /// a pod holding `destination`.
    pub async fn open(
        &self,
        source: &NetnsSockets,
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
        let key = (source.cookie(), source_id.clone(), addr);
        let connect_request = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(())
                .map_err(|_| HboneError::Refused {
                    addr,
                    target,
                    status: StatusCode::BAD_REQUEST,
                })
        };
        let mut reused = true;
        let mut connection = match self.pooled(&key, &certificate) {
            Some(connection) => connection,
            None => {
                let turn = self.connecting_lock(&key);
                let _turn = turn.lock().await;
                // Whoever held the lock before may have made the connection we need.
                match self.pooled(&key, &certificate) {
                    Some(connection) => connection,
                    None => {
                        reused = false;
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
                }
            }
        };
        let mut stream = StreamCount::take(&connection.streams);
        let (response, send) = match send_connect(&connection.sender, connect_request()?).await {
            Ok(sent) => sent,
            // A pooled connection whose peer has just sent GOAWAY (a draining agent) or
            // died: the stream was never processed, so it goes out on a new connection.
            Err(error) if reused => {
                tracing::debug!(%addr, %error, "pooled HBONE connection took no new stream; opening a new one");
                self.forget(&key, &connection);
                connection = self
                    .fresh(key, &certificate, source, destination, mark, timeout)
                    .await?;
                stream = StreamCount::take(&connection.streams);
                send_connect(&connection.sender, connect_request()?)
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
        Ok(Tunnel {
            io: TunnelStream::new(send, response.into_body()),
            carrier: Carrier(connection.sender),
            _stream: stream,
        })
    }

    /// A new pooled connection for `key`.
    async fn fresh(
        &self,
        key: PoolKey,
        certificate: &Arc<WorkloadCertificate>,
        source: &NetnsSockets,
        destination: &SpiffeId,
        mark: u32,
        timeout: Duration,
    ) -> Result<Pooled, HboneError> {
        let sender = self
            .connect(source, certificate, destination, key.2, mark, timeout)
            .await?;
        let pooled = Pooled {
            certificate: Arc::clone(certificate),
            sender,
            streams: Arc::default(),
        };
        self.lock().entry(key).or_default().push(pooled.clone());
        Ok(pooled)
    }

    fn connecting_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut connecting = self
            .connecting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Locks nobody holds or waits for are dropped on the way.
        connecting.retain(|_, lock| Arc::strong_count(lock) > 1);
        Arc::clone(connecting.entry(key.clone()).or_default())
    }

    /// Drops `connection` from the pool.
    fn forget(&self, key: &PoolKey, connection: &Pooled) {
        let mut pool = self.lock();
        if let Some(connections) = pool.get_mut(key) {
            connections.retain(|c| !Arc::ptr_eq(&c.streams, &connection.streams));
            if connections.is_empty() {
                pool.remove(key);
            }
        }
    }

    /// A live pooled connection made with the current certificate that has room for
    /// another tunnel; connections that are closed or made with a renewed certificate are
    /// dropped from the pool on the way.
    fn pooled(&self, key: &PoolKey, certificate: &Arc<WorkloadCertificate>) -> Option<Pooled> {
        let mut pool = self.lock();
        let connections = pool.get_mut(key)?;
        connections
            .retain(|c| Arc::ptr_eq(&c.certificate, certificate) && !takes_no_streams(&c.sender));
        let found = connections
            .iter()
            .find(|c| c.streams.load(Ordering::Acquire) < MAX_STREAMS_PER_CONNECTION)
            .cloned();
        if connections.is_empty() {
            pool.remove(key);
        }
        found
    }

    async fn connect(
        &self,
        source: &NetnsSockets,
        certificate: &WorkloadCertificate,
        destination: &SpiffeId,
        addr: SocketAddr,
        mark: u32,
        timeout: Duration,
    ) -> Result<SendRequest<Bytes>, HboneError> {
        let socket = pod_socket(source, addr, mark)?;
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
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(CLIENT_STREAM_WINDOW)
            .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
            .max_send_buffer_size(CLIENT_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_reset_streams(RESET_STREAMS_KEPT)
            .enable_push(false)
            .handshake(tls)
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

/// Sends a CONNECT on `sender`'s connection once it takes a new stream; returns the
/// response and the stream's send half.
async fn send_connect(
    sender: &SendRequest<Bytes>,
    request: Request<()>,
) -> Result<(hyper::Response<h2::RecvStream>, h2::SendStream<Bytes>), h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let (response, send) = sender.send_request(request, false)?;
    Ok((response.await?, send))
}
