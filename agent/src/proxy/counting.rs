//! One stream wrapper, [`Tapped`], for everything the proxy does beside forwarding a stream's
//! bytes: count both ways into a shared `Meter` that outlives the stream (`MeteredStream`: an
//! HTTP server owns and drops its stream), or replay bytes already consumed before reading on
//! (`detect::Prefixed`). Counting in the stream keeps byte counters exact even when the
//! server ends with an error. (The relay counts what it copies itself.)

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a [`Tapped`] stream does beside forwarding.
pub trait Tap {
    /// Fills `buf` itself rather than reading the inner stream, when it has bytes to give.
    fn serve_read(&mut self, _buf: &mut ReadBuf<'_>) -> bool {
        false
    }
    /// Whether it holds bytes that a read would return before the inner stream's.
    fn has_buffered(&self) -> bool {
        false
    }
    /// `n` bytes were read from the inner stream.
    fn on_read(&mut self, _n: usize) {}
    /// `n` bytes were written to the inner stream.
    fn on_written(&mut self, _n: usize) {}
}

pin_project! {
    /// A stream that forwards to `inner` and tells `tap` what passes.
    pub struct Tapped<S, T> {
        #[pin]
        inner: S,
        tap: T,
    }
}

impl<S, T> Tapped<S, T> {
    pub fn with_tap(inner: S, tap: T) -> Self {
        Self { inner, tap }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn tap(&self) -> &T {
        &self.tap
    }
}

impl<S: AsyncRead, T: Tap> AsyncRead for Tapped<S, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.tap.serve_read(buf) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.tap.on_read(buf.filled().len() - before);
        }
        poll
    }
}

impl<S: AsyncWrite, T: Tap> AsyncWrite for Tapped<S, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.tap.on_written(n);
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.tap.on_written(n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Bytes read from and written to a `MeteredStream`.
#[derive(Debug, Default)]
pub struct Meter {
    read: AtomicU64,
    written: AtomicU64,
}

impl Meter {
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Tap for Arc<Meter> {
    fn on_read(&mut self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn on_written(&mut self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A stream that counts both ways into a shared [`Meter`].
pub type MeteredStream<S> = Tapped<S, Arc<Meter>>;

impl<S> Tapped<S, Arc<Meter>> {
    pub fn new(inner: S, meter: Arc<Meter>) -> Self {
        Self::with_tap(inner, meter)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_meter_counts_both_ways_and_outlives_its_stream() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let meter = Arc::new(Meter::default());
        let mut metered = MeteredStream::new(ours, Arc::clone(&meter));
        peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        metered.read_exact(&mut buf).await.unwrap();
        metered.write_all(b"pong!").await.unwrap();
        drop(metered);
        assert_eq!((meter.read(), meter.written()), (4, 5));
    }
}
