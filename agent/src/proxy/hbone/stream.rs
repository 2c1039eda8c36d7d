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
    /// END_STREAM or RST_STREAM went out: no more data is sent.
    send_closed: bool,
    /// RST_STREAM went out (after an END_STREAM it still may: the peer may be sending).
    reset_sent: bool,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            received: Bytes::new(),
            send_closed: false,
            reset_sent: false,
        }
    }

    /// Ends the tunnel with RST_STREAM(CONNECT_ERROR): its TCP end was reset, and the
    /// peer resets the other.
    pub fn reset(&mut self) {
        if !self.reset_sent {
            self.send.send_reset(Reason::CONNECT_ERROR);
            self.reset_sent = true;
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

    /// A peer that already ended the stream with CANCEL or NO_ERROR (it is done with it)
    /// makes the END_STREAM moot, not a failure.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.send_closed {
            this.send_closed = true;
            if let Err(error) = this.send.send_data(Bytes::new(), true) {
                if let Poll::Ready(Ok(Reason::CANCEL | Reason::NO_ERROR)) = this.send.poll_reset(cx)
                {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(stream_error(error)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::{Method, Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A tunnel over an in-memory HTTP/2 connection: (client end, server end, and the
    /// client's connection handle, which keeps the connection open while it is held).
    async fn tunnel() -> (TunnelStream, TunnelStream, h2::client::SendRequest<Bytes>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            let send = respond.send_response(Response::new(()), false).unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            TunnelStream::new(send, request.into_body())
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut ready = sender.clone().ready().await.unwrap();
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = ready.send_request(connect, false).unwrap();
        let response = response.await.unwrap();
        let client = TunnelStream::new(send, response.into_body());
        (client, server.await.unwrap(), sender)
    }

    #[tokio::test]
    async fn an_orderly_end_reads_as_the_end_both_ways() {
        let (mut client, mut server, _connection) = tunnel().await;
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }

    #[tokio::test]
    async fn a_reset_reads_as_a_reset() {
        let (mut client, mut server, _connection) = tunnel().await;
        client.write_all(b"x").await.unwrap();
        server.read_exact(&mut [0; 1]).await.unwrap();
        client.reset();
        let error = server.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    }

    #[tokio::test]
    async fn a_reset_after_the_end_of_sending_still_reaches_a_peer_that_sends() {
        let (mut client, mut server, _connection) = tunnel().await;
        client.shutdown().await.unwrap();
        let mut nothing = Vec::new();
        server.read_to_end(&mut nothing).await.unwrap();
        client.reset();
        // The server goes on sending; the client, which never reads, would let it fill the
        // window and wait forever if the reset had not gone out.
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(error) = server.write_all(&[0; 1024]).await {
                    return error;
                }
            }
        })
        .await
        .expect("the server learned of the reset");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionReset, "{refused}");
    }

    #[tokio::test]
    async fn a_peer_done_with_the_stream_ends_it_and_makes_the_shutdown_moot() {
        let (client, mut server, _connection) = tunnel().await;
        // Dropped while open both ways: h2 sends RST_STREAM(CANCEL).
        drop(client);
        let mut nothing = Vec::new();
        server.read_to_end(&mut nothing).await.unwrap();
        server.shutdown().await.unwrap();
    }
}
