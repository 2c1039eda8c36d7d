//! One HBONE tunnel as a byte stream: an HTTP/2 stream's send and receive halves (h2's),
//! read and written like a TCP connection. Both ends of a tunnel use it: the client's
//! CONNECT stream and the server's accepted one.
//!
//! The tunnel ends as the TCP connection it carries does, as RFC 9113 §8.5 asks of a
//! CONNECT proxy: a shutdown sends END_STREAM (the FIN), [`TunnelStream::reset`] sends
//! RST_STREAM with CONNECT_ERROR (the reset), and a CONNECT_ERROR (or any other error) from
//! the peer reads as `ConnectionReset`, so that the relay resets its TCP end in turn. A
//! client that resets its connection is then seen as a reset by the server, with no
//! TIME_WAIT left behind in either pod, as without the mesh. CANCEL and NO_ERROR read as
//! the stream's end: that is what a peer sends when it drops a tunnel it has finished with.
//!
//! Not hyper's upgraded streams: those cannot send a reset, read a CANCEL as the end, and
//! move every write through a task and a channel of their own per stream.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not read yet (h2's own buffer: no copy until read).
    received: Bytes,
    /// END_STREAM or RST_STREAM went out: nothing more is sent.
    send_closed: bool,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            received: Bytes::new(),
            send_closed: false,
        }
    }

    /// Ends the tunnel with RST_STREAM(CONNECT_ERROR): its TCP end was reset, and the
    /// peer resets the other.
    pub fn reset(&mut self) {
        if !self.send_closed {
            self.send.send_reset(Reason::CONNECT_ERROR);
            self.send_closed = true;
        }
    }

    /// Ready once bytes are received, or the stream ended or failed: a read would not wait.
    pub fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.received.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => break,
                Some(Ok(data)) => self.received = data,
                Some(Err(error)) if is_end(&error) => break,
                Some(Err(error)) => return Poll::Ready(Err(stream_error(error))),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Whether the peer only said it was done with the stream (CANCEL, NO_ERROR): its end.
fn is_end(error: &h2::Error) -> bool {
    matches!(error.reason(), Some(Reason::CANCEL | Reason::NO_ERROR))
}

/// What any other failure of the stream means to the TCP end: a reset.
fn stream_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, error)
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_receive(cx))?;
        let n = this.received.len().min(buf.remaining());
        buf.put_slice(&this.received[..n]);
        this.received.advance(n);
        // The peer may send as much again (flow control); an error means the stream is
        // gone, which the next read reports.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.send_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        while this.send.capacity() == 0 {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(stream_error(error))),
                // The stream takes no more data: the peer reset it.
                None => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
        let n = this.send.capacity().min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(stream_error)?;
        Poll::Ready(Ok(n))
    }

    /// h2's connection task writes what was sent; there is nothing to flush here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.send_closed {
            this.send_closed = true;
            this.send
                .send_data(Bytes::new(), true)
                .map_err(stream_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
