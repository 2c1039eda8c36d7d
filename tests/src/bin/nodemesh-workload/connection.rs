//! Connections as the clients check them: dialled and confirmed with getpeername(), a
//! payload echoed byte for byte, failures counted by kind, and the JSON summary; and the
//! dual-stack listener every server binds.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::json;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// How many error messages a summary quotes.
pub(crate) const MAX_ERRORS: usize = 5;

/// One port or an inclusive range `a-b`.
#[derive(Clone, Debug)]
pub(crate) struct PortSpec(Vec<u16>);

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|e| format!("bad port {p:?}: {e}"))
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse(a)?, parse(b)?);
                if a > b {
                    return Err(format!("empty port range {s}"));
                }
                Ok(Self((a..=b).collect()))
            }
            None => Ok(Self(vec![parse(s)?])),
        }
    }
}

/// Every port of `ports`, in order.
pub(crate) fn flatten(ports: &[PortSpec]) -> Vec<u16> {
    ports.iter().flat_map(|p| p.0.iter().copied()).collect()
}

/// A dual-stack listener on `[::]:port` (IPV6_V6ONLY off, so IPv4 clients reach it too).
pub(crate) fn listen_dual_stack(port: u16) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None).context("socket")?;
    socket.set_only_v6(false).context("IPV6_V6ONLY off")?;
    socket.set_reuse_address(true).context("SO_REUSEADDR")?;
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(1024).context("listen")?;
    socket.set_nonblocking(true).context("O_NONBLOCK")?;
    TcpListener::from_std(socket.into()).context("registering the listener")
}

/// A payload unique to connection `index`, so crossed connections are caught.
pub(crate) fn pattern(index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| ((j * 131 + index * 7919 + (j >> 8)) % 251) as u8)
        .collect()
}

/// Why one connection failed.
pub(crate) enum Failure {
    PeerMismatch(String),
    /// A socket call failed: what was being done, and the error.
    Io(String, std::io::Error),
    /// What did not finish in time.
    TimedOut(String),
    Other(String),
}

impl Failure {
    pub(crate) fn message(&self) -> String {
        match self {
            Failure::PeerMismatch(message) | Failure::Other(message) => message.clone(),
            Failure::Io(doing, error) => format!("{doing}: {error}"),
            Failure::TimedOut(doing) => format!("{doing}: timed out"),
        }
    }

    /// The kind of failure, to count failures by: `eperm` (refused by the connect hook's
    /// fail mode), `reset`, `connection_refused`, `timed_out`, `peer_mismatch`, `io`
    /// (another error of a socket call) or `other` (a wrong or short echo, say).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Failure::PeerMismatch(_) => "peer_mismatch",
            Failure::TimedOut(_) => "timed_out",
            Failure::Other(_) => "other",
            Failure::Io(_, error) => match error.raw_os_error() {
                Some(libc::EPERM) => "eperm",
                Some(libc::ECONNRESET | libc::EPIPE) => "reset",
                Some(libc::ECONNREFUSED) => "connection_refused",
                _ => "io",
            },
        }
    }
}

/// Connects to `target`, checks that getpeername() reports `target`.
pub(crate) async fn connect_checked(
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, Failure> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| Failure::TimedOut(format!("connect to {target}")))?
        .map_err(|e| Failure::Io(format!("connect to {target}"), e))?;
    let _ = stream.set_nodelay(true);
    // peer_addr() is getpeername(2): what the application sees, whatever carried the bytes.
    let peer = stream
        .peer_addr()
        .map_err(|e| Failure::Io("getpeername".to_owned(), e))?;
    if peer != target {
        return Err(Failure::PeerMismatch(format!(
            "getpeername says {peer}, dialled {target}"
        )));
    }
    Ok(stream)
}

/// Sends `payload`, half-closes, reads everything back and compares byte for byte.
pub(crate) async fn exchange(
    stream: TcpStream,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), Failure> {
    let (mut reader, mut writer) = stream.into_split();
    let send = async {
        writer.write_all(payload).await?;
        writer.shutdown().await
    };
    let receive = async {
        let mut echoed = Vec::with_capacity(payload.len());
        reader.read_to_end(&mut echoed).await.map(|_| echoed)
    };
    let (_, echoed) = tokio::time::timeout(timeout, async { tokio::try_join!(send, receive) })
        .await
        .map_err(|_| Failure::TimedOut("echo".to_owned()))?
        .map_err(|e| Failure::Io("echo".to_owned(), e))?;
    if echoed != payload {
        let first_difference = echoed
            .iter()
            .zip(payload)
            .position(|(a, b)| a != b)
            .unwrap_or(echoed.len().min(payload.len()));
        return Err(Failure::Other(format!(
            "echo differs: sent {} bytes, got {}, first difference at byte {first_difference}",
            payload.len(),
            echoed.len()
        )));
    }
    Ok(())
}

/// Counts outcomes and prints the JSON summary; Err if anything failed.
#[derive(Default)]
pub(crate) struct Tally {
    ok: usize,
    pub(crate) failed: usize,
    peer_mismatch: usize,
    errors: Vec<String>,
}

impl Tally {
    pub(crate) fn record(&mut self, label: &str, outcome: Result<(), Failure>) {
        let failure = match outcome {
            Ok(()) => {
                self.ok += 1;
                return;
            }
            Err(failure) => failure,
        };
        if let Failure::PeerMismatch(_) = failure {
            self.peer_mismatch += 1;
        }
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(format!("{label}: {}", failure.message()));
        }
    }

    pub(crate) fn finish(self, connections: usize, extra: serde_json::Value) -> anyhow::Result<()> {
        let mut summary = json!({
            "connections": connections,
            "ok": self.ok,
            "failed": self.failed,
            "peer_mismatch": self.peer_mismatch,
            "errors": self.errors,
        });
        if let (Some(summary), Some(extra)) = (summary.as_object_mut(), extra.as_object()) {
            summary.extend(extra.clone());
        }
        println!("{summary}");
        if self.ok != connections {
            bail!(
                "{} of {connections} connections failed",
                connections - self.ok
            );
        }
        Ok(())
    }
}

/// The payload of connect-many connection `index`: its index and port, repeated to `len` bytes.
pub(crate) fn tagged_payload(index: usize, port: u16, len: usize) -> Vec<u8> {
    let tag = format!("conn={index:06};port={port:05};");
    tag.bytes().cycle().take(len).collect()
}
