//! Stream wrappers that count bytes, so byte counters stay exact even when a copy ends with
//! an error: `CountingStream` counts what is read from it; `MeteredStream` counts both ways
//! into a shared `Meter` that outlives the stream (an HTTP server owns and drops its stream).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct CountingStream<S> {
    inner: S,
    read: u64,
}

impl<S> CountingStream<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, read: 0 }
    }

    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.read += (buf.filled().len() - before) as u64;
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

pub struct MeteredStream<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> MeteredStream<S> {
    pub fn new(inner: S, meter: Arc<Meter>) -> Self {
        Self { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MeteredStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let n = (buf.filled().len() - before) as u64;
            self.meter.read.fetch_add(n, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.meter.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
