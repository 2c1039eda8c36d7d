//! What can go wrong opening an HBONE tunnel.

use std::{net::SocketAddr, time::Duration};

use hyper::StatusCode;

use super::HBONE_PORT;
use crate::{
    identity::{spiffe::SpiffeId, tls::TlsError},
    netns::NetnsError,
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(
        "source {0} holds no valid certificate (none issued yet, or expired without renewal: is the CA reachable?); refusing to send mesh traffic in the clear"
    )]
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
    Http { addr: SocketAddr, source: h2::Error },
    #[error("CONNECT {target} refused by {addr}: {status}")]
    Refused {
        addr: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
}
