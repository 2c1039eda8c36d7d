//! A connection from a pod to its destination: an HBONE tunnel to a meshed pod, plain TCP
//! from the pod's network namespace to anything else, or (for the L7 proxy's pooled
//! connections) a socket pair into the admission of a meshed pod of this node; and why one
//! could not be made.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    netns::NetnsError,
    proxy::{
        hbone::{
            client::{Carrier, Tunnel},
            error::HboneError,
        },
        inbound::admission::Refusal,
        relay::Relayable,
        socket_pair::PairEnd,
    },
};

/// A connection to a destination, made by `OutboundContext::dial`.
///
/// An enum of our own rather than `tokio_util::either::Either<Tunnel, TcpStream>`: the
/// callers ask which kind it is (`Mesh` is what mutual TLS means in the metrics, `Direct`
/// gets reset on failure), and names say that better than `Left`/`Right`; the forwarding
/// below is the few lines `Either` would have, plus the relay's readiness.
pub enum Upstream {
    Mesh(Tunnel),
    Direct(TcpStream),
    /// A meshed pod of this node, reached in process: the near end of a socket pair whose
    /// far end this node's inbound side admitted and serves towards the application
    /// (`OutboundContext::dial_pooled`). L4 connections are handed over whole instead
    /// (`Connected::ThisNode`).
    ThisNode(PairEnd),
}

impl Upstream {
    /// The HBONE connection a mesh upstream travels in.
    pub fn carrier(&self) -> Option<Carrier> {
        match self {
            Self::Mesh(tunnel) => Some(tunnel.carrier()),
            Self::Direct(_) | Self::ThisNode(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("this pod has no identity; refusing to send mesh traffic in the clear")]
    NoIdentity,
    #[error("HBONE: {0}")]
    Hbone(#[from] HboneError),
    #[error(transparent)]
    Direct(#[from] OutboundError),
    #[error("refused by the destination on this node: {0}")]
    ThisNode(#[from] Refusal),
    #[error("a socket pair to the destination on this node: {0}")]
    SocketPair(io::Error),
}

impl DialError {
    /// Whether the endpoint failed (another endpoint may answer), as opposed to this pod
    /// (no identity or certificate) or the destination's policy refusing it.
    pub fn endpoint_failed(&self) -> bool {
        match self {
            Self::Hbone(HboneError::Refused { status, .. }) => {
                *status != hyper::StatusCode::FORBIDDEN
            }
            Self::Hbone(
                HboneError::Connect { .. }
                | HboneError::Timeout { .. }
                | HboneError::Handshake { .. }
                | HboneError::Http { .. },
            )
            | Self::Direct(OutboundError::Connect(..) | OutboundError::ConnectTimeout(..))
            | Self::ThisNode(Refusal::AtBound | Refusal::Application(_)) => true,
            // This node's side (no identity or certificate, TLS configuration, sockets), or a
            // policy of the destination's.
            Self::NoIdentity
            | Self::Hbone(_)
            | Self::Direct(_)
            | Self::ThisNode(_)
            | Self::SocketPair(_) => false,
        }
    }
}

impl Relayable for Upstream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Mesh(tunnel) => tunnel.poll_readable(cx),
            Self::Direct(stream) => stream.poll_readable(cx),
            Self::ThisNode(stream) => stream.poll_readable(cx),
        }
    }

    fn abort(&mut self) {
        match self {
            Self::Mesh(tunnel) => tunnel.abort(),
            Self::Direct(stream) => stream.abort(),
            Self::ThisNode(stream) => stream.abort(),
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Mesh(tunnel) => Pin::new(tunnel).poll_read(cx, buf),
            Self::Direct(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::ThisNode(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Mesh(tunnel) => Pin::new(tunnel).poll_write(cx, buf),
            Self::Direct(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::ThisNode(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Mesh(tunnel) => Pin::new(tunnel).poll_flush(cx),
            Self::Direct(stream) => Pin::new(stream).poll_flush(cx),
            Self::ThisNode(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Mesh(tunnel) => Pin::new(tunnel).poll_shutdown(cx),
            Self::Direct(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::ThisNode(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "no original destination recorded for peer {0} (connection not made through the connect hook?)"
    )]
    NoOriginalDestination(SocketAddr),
    #[error("creating the upstream socket: {0}")]
    Socket(#[from] NetnsError),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("connecting to {0}: no answer within {1:?}")]
    ConnectTimeout(SocketAddr, Duration),
}
