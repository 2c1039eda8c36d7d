//! One stream wrapper, [`Tapped`], for everything the proxy does beside forwarding a stream's
//! bytes: count what is read (`CountingStream`), count both ways into a shared `Meter` that
//! outlives the stream (`MeteredStream`: an HTTP server owns and drops its stream), or replay
//! bytes already consumed before reading on (`detect::Prefixed`). Counting in the stream keeps
//! byte counters exact even when a copy ends with an error.

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

/// Bytes read, for [`CountingStream`].
#[derive(Debug, Default)]
pub struct ReadCount(u64);

impl Tap for ReadCount {
    fn on_read(&mut self, n: usize) {
        self.0 += n as u64;
    }
}

/// A stream that counts what is read from it.
pub type CountingStream<S> = Tapped<S, ReadCount>;

impl<S> Tapped<S, ReadCount> {
    pub fn new(inner: S) -> Self {
        Self::with_tap(inner, ReadCount::default())
    }

    pub fn bytes_read(&self) -> u64 {
        self.tap.0
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
    async fn counts_what_was_read_even_if_the_copy_fails_later() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut counted = CountingStream::new(reader);
        writer.write_all(b"hello").await.unwrap();
        drop(writer);
        let mut out = Vec::new();
        counted.read_to_end(&mut out).await.unwrap();
        assert_eq!(counted.bytes_read(), 5);
    }

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
