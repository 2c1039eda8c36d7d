//! Copying a proxied connection both ways, with exact byte counts, passing failures on: when
//! one end fails (a TCP reset, an HTTP/2 stream reset, an I/O error), both ends are aborted
//! ([`Relayable::abort`]), so the peer on the other side sees a reset as it would have
//! without the proxy, and no TIME_WAIT piles up in the pods.
//!
//! Most proxied connections are idle most of the time, and the proxy holds thousands of
//! them. So, unlike `tokio::io::copy_bidirectional`, which keeps an 8 KiB buffer per
//! direction for a connection's whole life, a direction here holds a buffer only while
//! bytes move: it waits for its reader to become readable without one ([`Relayable`]), takes
//! a buffer from a small per-thread pool, reads and writes until the reader has nothing
//! more, and gives the buffer back. An idle connection costs its sockets and its task, no
//! buffer (docs/benchmarks.md, "memory per idle connection").

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use pin_project_lite::pin_project;
use socket2::SockRef;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    counting::{Tap, Tapped},
    hbone::stream::TunnelStream,
};

/// What one read may move at most: a TLS record's worth, so that the HBONE side writes
/// whole records.
const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers each worker thread keeps for the next busy connection (at most 1 MiB a thread).
const POOLED_PER_THREAD: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    POOL.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
}

fn give_back(buffer: Box<[u8]>) {
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOLED_PER_THREAD {
            pool.push(buffer);
        }
    });
}

/// A stream the relay can carry: it can be waited on without lending it a buffer, and its
/// end can be made a reset.
pub trait Relayable: AsyncRead + AsyncWrite + Unpin {
    /// Ready once a read would not wait: bytes, the end of the stream, or an error are
    /// there. May be ready spuriously (the read then waits, and wakes the task later).
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Makes the stream's end a reset rather than an orderly close: the relay does this to
    /// both ends when either fails.
    fn abort(&mut self);
}

impl Relayable for TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn abort(&mut self) {
        reset(self);
    }
}

/// An HBONE tunnel: readable once its next DATA frame (already in h2's buffer) or its end
/// is there; aborted with RST_STREAM(CONNECT_ERROR).
impl Relayable for TunnelStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_receive(cx)
    }

    fn abort(&mut self) {
        self.reset();
    }
}

impl<S: Relayable, T: Tap + Unpin> Relayable for Tapped<S, T> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tap().has_buffered() {
            return Poll::Ready(Ok(()));
        }
        self.inner_mut().poll_readable(cx)
    }

    fn abort(&mut self) {
        self.inner_mut().abort();
    }
}

/// Copies until both directions finish; returns the bytes read from `a` and from `b`.
/// When the copy fails (a reset, an HTTP/2 stream reset, an I/O error), both ends are
/// aborted before they are dropped.
pub fn relay<A: Relayable, B: Relayable>(a: A, b: B) -> Relay<A, B, std::future::Pending<()>> {
    relay_until(a, b, std::future::pending())
}

/// `relay`, cut short when `until` resolves (the connection's authorization was withdrawn):
/// then both ends are aborted too.
pub fn relay_until<A: Relayable, B: Relayable, U: Future<Output = ()>>(
    a: A,
    b: B,
    until: U,
) -> Relay<A, B, U> {
    Relay {
        a,
        b,
        until,
        a_to_b: Direction::default(),
        b_to_a: Direction::default(),
    }
}

pin_project! {
    /// A relay in progress. A struct rather than an `async fn`: it lives as long as the
    /// connection, and a compiler-made future would also keep the copies its streams were
    /// moved out of.
    pub struct Relay<A, B, U> {
        a: A,
        b: B,
        #[pin]
        until: U,
        a_to_b: Direction,
        b_to_a: Direction,
    }
}

impl<A: Relayable, B: Relayable, U: Future<Output = ()>> Future for Relay<A, B, U> {
    type Output = (u64, u64);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(u64, u64)> {
        let this = self.project();
        let forward = this.a_to_b.poll_copy(cx, this.a, this.b);
        let backward = this.b_to_a.poll_copy(cx, this.b, this.a);
        let failed = match (forward, backward) {
            (Poll::Ready(Err(error)), _) | (_, Poll::Ready(Err(error))) => {
                tracing::debug!(%error, "proxied connection ended with an error");
                true
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => false,
            _ => match this.until.poll(cx) {
                Poll::Ready(()) => true,
                Poll::Pending => return Poll::Pending,
            },
        };
        if failed {
            this.a.abort();
            this.b.abort();
        }
        Poll::Ready((this.a_to_b.read, this.b_to_a.read))
    }
}

/// One direction of a relay.
#[derive(Default)]
struct Direction {
    /// Held only while bytes are on their way.
    buffer: Option<Box<[u8]>>,
    /// The bytes of `buffer` read and not written yet.
    start: usize,
    end: usize,
    /// Bytes read from the reader so far.
    read: u64,
    reader_done: bool,
    /// Written since the last flush.
    unflushed: bool,
    finished: bool,
}

impl Direction {
    /// Moves what the reader has to the writer; ready once the reader ended and the writer
    /// was shut down.
    fn poll_copy<R: Relayable, W: Relayable>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.start < self.end {
                let Some(buffer) = &self.buffer else { break };
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &buffer[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.unflushed = true;
            }
            if self.reader_done {
                self.release();
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            match self.poll_fill(cx, reader)? {
                Poll::Ready(()) => {}
                Poll::Pending => {
                    // Nothing more for now: what was written goes out, and the buffer
                    // goes back to the pool until the reader has something again.
                    self.release();
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Reads into the (empty) buffer, taking one first once the reader is readable.
    fn poll_fill<R: Relayable>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<()>> {
        if self.buffer.is_none() {
            ready!(reader.poll_readable(cx))?;
        }
        let buffer = self.buffer.get_or_insert_with(take_buffer);
        let mut read_buf = ReadBuf::new(&mut buffer[..]);
        ready!(Pin::new(&mut *reader).poll_read(cx, &mut read_buf))?;
        let n = read_buf.filled().len();
        self.read += n as u64;
        (self.start, self.end) = (0, n);
        self.reader_done = n == 0;
        Poll::Ready(Ok(()))
    }

    fn release(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back(buffer);
        }
        (self.start, self.end) = (0, 0);
    }
}

/// Makes the close of `stream` a reset (SO_LINGER 0).
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_counts_and_holds_no_buffer_while_idle() {
        let (mut left, a) = pair().await;
        let (b, mut right) = pair().await;
        let relayed = tokio::spawn(relay(a, b));
        left.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        right.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // Larger than one buffer, the other way.
        let bulk = vec![7u8; 3 * BUFFER_SIZE + 5];
        let (sent, received) = tokio::join!(right.write_all(&bulk), async {
            let mut back = vec![0u8; bulk.len()];
            left.read_exact(&mut back).await.map(|_| back)
        });
        sent.unwrap();
        assert_eq!(received.unwrap(), bulk);
        drop(left);
        right.shutdown().await.unwrap();
        let mut rest = Vec::new();
        right.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (from_a, from_b) = relayed.await.unwrap();
        assert_eq!((from_a, from_b), (4, bulk.len() as u64));
    }

    #[tokio::test]
    async fn until_cuts_the_relay_short_and_resets_both_ends() {
        let (mut left, a) = pair().await;
        let (b, mut right) = pair().await;
        let counts = relay_until(a, b, std::future::ready(())).await;
        assert_eq!(counts, (0, 0));
        for end in [&mut left, &mut right] {
            let error = end.read(&mut [0; 1]).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        }
    }

    #[tokio::test]
    async fn a_reset_end_resets_the_other() {
        let (left, a) = pair().await;
        let (b, mut right) = pair().await;
        let relayed = tokio::spawn(relay(a, b));
        reset(&left);
        drop(left);
        let error = right.read(&mut [0; 1]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        relayed.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_direction_gives_its_buffer_back() {
        let (mut left, mut a) = pair().await;
        let (mut b, _right) = pair().await;
        let mut direction = Direction::default();
        left.write_all(b"x").await.unwrap();
        a.readable().await.unwrap();
        // Ready: one byte read and written; then the reader is dry and the buffer released.
        let outcome = poll_fn(|cx| Poll::Ready(direction.poll_copy(cx, &mut a, &mut b))).await;
        assert!(outcome.is_pending());
        assert_eq!(direction.read, 1);
        assert!(
            direction.buffer.is_none(),
            "an idle direction holds a buffer"
        );
    }
}
