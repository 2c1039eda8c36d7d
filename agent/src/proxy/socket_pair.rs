//! A Unix socket pair between two sides of this agent: the L7 proxy's pooled connection to
//! a meshed pod of this node on one end, that pod's admission on the other. Unix sockets
//! have no reset, so an end the relay aborts marks the pair: the other end then reads a
//! reset instead of an orderly end, as it would over TCP or HBONE (a response cut short
//! by the application's reset must not pass for a whole one).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use socket2::SockRef;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
};

use super::relay::Relayable;

/// One end of the pair.
pub struct PairEnd {
    stream: UnixStream,
    /// Set by whichever end was aborted, before it shuts the pair down.
    reset: Arc<AtomicBool>,
}

/// A connected pair of ends.
pub fn pair() -> io::Result<(PairEnd, PairEnd)> {
    let (near, far) = UnixStream::pair()?;
    let reset = Arc::new(AtomicBool::new(false));
    Ok((
        PairEnd {
            stream: near,
            reset: Arc::clone(&reset),
        },
        PairEnd { stream: far, reset },
    ))
}

impl AsyncRead for PairEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        let at_end = buf.filled().len() == before && buf.remaining() > 0;
        if at_end && this.reset.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PairEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Relayable for PairEnd {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_read_ready(cx)
    }

    fn abort(&mut self) {
        self.reset.store(true, Ordering::Release);
        let _ = SockRef::from(&self.stream).shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn an_orderly_end_reads_as_one_and_an_abort_as_a_reset() {
        let (mut near, mut far) = pair().expect("pair");
        far.write_all(b"partial").await.expect("write");
        far.shutdown().await.expect("shutdown");
        let mut read = Vec::new();
        near.read_to_end(&mut read).await.expect("an orderly end");
        assert_eq!(read, b"partial");

        let (mut near, mut far) = pair().expect("pair");
        far.write_all(b"partial").await.expect("write");
        far.abort();
        let mut read = Vec::new();
        let error = near.read_to_end(&mut read).await.expect_err("a reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(read, b"partial", "what came before the reset is read");
    }
}
