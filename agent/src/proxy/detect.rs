//! Protocol detection on the first bytes a client sends: HTTP/1.x, HTTP/2 with prior
//! knowledge, a TLS ClientHello, or anything else (opaque TCP).
//!
//! The bytes read are kept and replayed (`Prefixed`), so nothing is lost whatever the answer.
//! A client that sends nothing — because the protocol has the server speak first (SMTP,
//! MySQL, SSH banners) — must not stall: detection gives up after a bounded wait and the
//! connection is relayed as opaque TCP, so the server's first bytes are late by at most that
//! wait. A Service port's `appProtocol` saying HTTP lifts the bound (the client must speak
//! first), one saying anything else skips detection altogether, and so does a port in
//! `--opaque-ports` without an `appProtocol` (the well-known server-first ports, so their
//! banners are not late at all).

use std::{io, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::counting::{Tap, Tapped};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Enough for the longest method below plus a space.
const LONGEST_METHOD: usize = 8;
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    /// Not recognised, or nothing arrived within the wait.
    Opaque,
}

/// How to detect the protocol of a connection to a Service port.
#[derive(Debug, PartialEq, Eq)]
pub enum Detection {
    /// `appProtocol` names something that is not HTTP, or the port is an opaque one:
    /// opaque TCP, no waiting.
    Skip,
    /// `appProtocol` says HTTP: the client speaks first, wait for it.
    Unbounded,
    /// Nothing declared: wait at most this long.
    Bounded(Duration),
}

/// The Service port's `appProtocol` decides; unset means detect with the bounded wait,
/// except on an `opaque_port`.
pub fn detection_for(app_protocol: Option<&str>, opaque_port: bool, wait: Duration) -> Detection {
    match app_protocol {
        None if opaque_port => Detection::Skip,
        None => Detection::Bounded(wait),
        Some("http" | "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" | "kubernetes.io/ws") => {
            Detection::Unbounded
        }
        Some(_) => Detection::Skip,
    }
}

/// What the first bytes say, if they say enough yet.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let common = bytes.len().min(H2_PREFACE.len());
    if bytes[..common] == H2_PREFACE[..common] {
        return (common == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // TLS record: handshake (22), version 3.x.
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let mut undecided = false;
    for method in METHODS {
        let wanted_len = method.len() + 1;
        let mut wanted = method.to_vec();
        wanted.push(b' ');
        let n = bytes.len().min(wanted_len);
        if bytes[..n] == wanted[..n] {
            if n == wanted_len {
                return Some(Protocol::Http1);
            }
            undecided = true;
        }
    }
    if undecided && bytes.len() < LONGEST_METHOD {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// What detection found.
#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    /// The bytes read, to be replayed.
    pub prefix: Vec<u8>,
    /// The wait passed before the bytes said enough (the protocol is then `Opaque`).
    pub timed_out: bool,
}

/// Reads from `stream` until the protocol is known, the stream ends, or `wait` passes
/// (`None`: no bound).
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    wait: Option<Duration>,
) -> io::Result<Detected> {
    let mut buffer = Vec::with_capacity(64);
    let reading = async {
        let mut chunk = [0u8; 64];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, io::Error>(Protocol::Opaque);
            }
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(protocol) = classify(&buffer) {
                return Ok(protocol);
            }
        }
    };
    let (protocol, timed_out) = match wait {
        Some(wait) => match tokio::time::timeout(wait, reading).await {
            Ok(protocol) => (protocol?, false),
            Err(_) => (Protocol::Opaque, true),
        },
        None => (reading.await?, false),
    };
    Ok(Detected {
        protocol,
        prefix: buffer,
        timed_out,
    })
}

/// Bytes detection consumed, replayed by the first reads of a [`Prefixed`] stream.
pub struct Prefix {
    bytes: Vec<u8>,
    offset: usize,
}

impl Tap for Prefix {
    fn has_buffered(&self) -> bool {
        self.offset < self.bytes.len()
    }

    fn serve_read(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.offset >= self.bytes.len() {
            return false;
        }
        let n = buf.remaining().min(self.bytes.len() - self.offset);
        let start = self.offset;
        buf.put_slice(&self.bytes[start..start + n]);
        self.offset += n;
        if self.offset == self.bytes.len() {
            self.bytes = Vec::new();
            self.offset = 0;
        }
        true
    }
}

/// A stream whose first reads return `prefix`: the bytes detection consumed.
pub type Prefixed<S> = Tapped<S, Prefix>;

impl<S> Tapped<S, Prefix> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self::with_tap(
            inner,
            Prefix {
                bytes: prefix,
                offset: 0,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn app_protocol_decides_then_opaque_ports_then_the_bounded_wait() {
        let wait = Duration::from_millis(100);
        assert_eq!(
            detection_for(Some("http"), true, wait),
            Detection::Unbounded
        );
        assert_eq!(detection_for(Some("tcp"), false, wait), Detection::Skip);
        assert_eq!(detection_for(None, true, wait), Detection::Skip);
        assert_eq!(detection_for(None, false, wait), Detection::Bounded(wait));
        let ports = crate::config::OpaquePorts::new(vec![5432, 3306, 3306]);
        assert!(ports.contains(3306) && ports.contains(5432) && !ports.contains(80));
    }

    #[test]
    fn first_bytes_classify() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS "), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None, "could still be GET");
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Protocol::Opaque),
            "methods are case-sensitive"
        );
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n"),
            None,
            "a partial preface waits"
        );
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Protocol::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x00\x00\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b""), None);
    }

    #[tokio::test]
    async fn bytes_split_across_reads_are_detected_and_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"PO").await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(b"ST /x HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let detected = detect(&mut server, None).await.unwrap();
        assert_eq!(
            (detected.protocol, detected.timed_out),
            (Protocol::Http1, false)
        );
        let _client = writer.await.unwrap();
        let mut replayed = Prefixed::new(detected.prefix, server);
        let mut all = vec![0u8; 20];
        replayed.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"POST /x HTTP/1.1\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_wait() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let detected = detect(&mut server, Some(Duration::from_millis(100)))
            .await
            .unwrap();
        assert_eq!(
            (detected.protocol, detected.prefix.len(), detected.timed_out),
            (Protocol::Opaque, 0, true)
        );
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }
}
