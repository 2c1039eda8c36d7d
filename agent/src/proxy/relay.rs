//! Copying a proxied connection both ways, with exact byte counts, passing failures on.

use std::time::Duration;

use socket2::SockRef;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::counting::CountingStream;

/// Copies until both directions finish; returns the bytes read from `a` and from `b`.
/// When the copy fails (a reset, an HTTP/2 stream reset, an I/O error), `on_error` runs
/// before the streams are dropped, so a TCP end can be reset instead of closed: the peer
/// then sees the failure as it would have without the proxy, and no TIME_WAIT piles up in
/// the pod.
pub async fn relay<A, B>(a: A, b: B, on_error: impl FnOnce(&A, &B)) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_until(a, b, on_error, std::future::pending()).await
}

/// `relay`, cut short when `until` resolves (the connection's authorization was withdrawn):
/// then `on_error` runs too, so the ends are reset rather than closed.
pub async fn relay_until<A, B>(
    a: A,
    b: B,
    on_error: impl FnOnce(&A, &B),
    until: impl Future<Output = ()>,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = CountingStream::new(a);
    let mut b = CountingStream::new(b);
    let failed = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut a, &mut b) => copied
            .inspect_err(|error| tracing::debug!(%error, "proxied connection ended with an error"))
            .is_err(),
        () = until => true,
    };
    if failed {
        on_error(a.inner(), b.inner());
    }
    (a.bytes_read(), b.bytes_read())
}

/// Makes the close of `stream` a reset (SO_LINGER 0).
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
