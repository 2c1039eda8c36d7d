//! A stream wrapper that counts the bytes read from it, so byte counters stay exact even when
//! a copy ends with an error.

use std::{
    io,
    pin::Pin,
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
}
