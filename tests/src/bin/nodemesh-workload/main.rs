//! `nodemesh-workload`: the real TCP programs the testbed runs inside pods.
//!
//! Servers listen dual-stack on `[::]`; clients verify every byte they get back and that
//! `getpeername()` reports the address they dialled, print one JSON summary line on stdout,
//! and exit 0 only if everything checked out.

mod ca_load;
mod capture_watch;
mod flood;
mod h2c;
mod handoff_probe;
mod http_app;
mod soak;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// How many error messages a summary quotes.
const MAX_ERRORS: usize = 5;

#[derive(Parser)]
#[command(
    name = "nodemesh-workload",
    about = "Test programs for the nodemesh testbed"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sleep until killed: the pod sandbox process that holds the pod's network namespace.
    Pause,
    /// Echo every byte back until EOF, on each port (dual-stack `[::]`).
    EchoServer {
        /// Ports: `7000`, `7000,7001` or `7100-7119`; repeatable.
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<PortSpec>,
    },
    /// Send a pattern over each connection, check getpeername and the byte-exact echo.
    EchoClient {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Per-connection time limit.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Open all connections at once (round-robin over the ports), then echo on each.
    ConnectMany {
        #[arg(long)]
        target_ip: IpAddr,
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<PortSpec>,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
    },
    /// N sequential connect()+close(); prints the time per connect.
    ConnectLoop {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u64,
        /// Before closing, send this many bytes and wait for their echo (0: connect only).
        /// Measures a whole short-lived transaction, not just the local handshake.
        #[arg(long, default_value_t = 0)]
        echo_bytes: usize,
        /// `rst`: SO_LINGER 0 (no TIME_WAIT); `normal`: FIN.
        #[arg(long, value_enum, default_value_t = CloseMode::Rst)]
        close: CloseMode,
    },
    /// For `duration_ms` (and then until `until_file` exists, when given): `long_lived`
    /// connections that each exchange a tagged chunk every `interval_ms` and check its echo,
    /// then half-close and expect a clean close, while a loop opens short connections (64-byte
    /// echo, close) back to back. Prints counts; fails if anything failed.
    Soak {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 4)]
        long_lived: usize,
        #[arg(long)]
        duration_ms: u64,
        /// Go on past `duration_ms` until this file exists: the test creates it once what it
        /// does under load is done, however long that took.
        #[arg(long)]
        until_file: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Also GET / from this HTTP server over one keep-alive connection, back to back, as
        /// an HTTP client library does: a connection the server closed (or announced to close
        /// with `Connection: close`) before any byte of the response is replaced by a new one
        /// and the request sent again (RFC 9110 §9.2.2, idempotent); anything else fails.
        #[arg(long)]
        http_target: Option<SocketAddr>,
    },
    /// Load on `nodemesh ca serve` as agents make it: per request a new key pair, a CSR, a
    /// new TLS connection and a POST; `concurrency` requests in flight. Prints the rate and
    /// latency percentiles.
    CaLoad {
        #[arg(long)]
        ca: SocketAddr,
        #[arg(long, default_value = "nodemesh-ca")]
        server_name: String,
        #[arg(long)]
        trust_bundle: std::path::PathBuf,
        #[arg(long)]
        token_file: std::path::PathBuf,
        /// `namespace/name` of a pod on the token's node.
        #[arg(long)]
        pod: String,
        /// That pod's UID.
        #[arg(long)]
        pod_uid: String,
        #[arg(long)]
        requests: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Minimal HTTP/1.1 keep-alive server answering 200 with a fixed body.
    HttpServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Sent back in `x-served-by`.
        #[arg(long, default_value = "http-server")]
        name: String,
        /// Answer every request with this status (a failing endpoint).
        #[arg(long)]
        fail_status: Option<u16>,
        /// Delay every response by this much (a slow endpoint).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// An OTLP/HTTP collector stand-in: appends every POSTed body as one line to `--out`.
    OtlpReceiver {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// A server-speaks-first server: writes a banner line on accept, then echoes.
    BannerServer {
        #[arg(long)]
        port: u16,
    },
    /// Connects, sends nothing, and reads the server's first line; prints how long it took.
    ReadBanner {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// GETs on one keep-alive connection; prints statuses and servers (x-served-by) counted.
    HttpGet {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// `name:value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// One unary gRPC call (HTTP/2 prior knowledge) to the http-server's echo method.
    GrpcCall {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "hello")]
        message: String,
    },
    /// A server that honours `Upgrade: h2c` (101, then HTTP/2 on the connection); every
    /// answer names the path and protocol it was served on.
    H2cServer {
        #[arg(long)]
        port: u16,
    },
    /// h2c smuggling: `GET upgrade_path` asking for h2c; once switched, `smuggled_path` over
    /// HTTP/2. Prints the statuses; fails if the smuggled request is not answered 200.
    H2cSmuggle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        upgrade_path: String,
        #[arg(long)]
        smuggled_path: String,
    },
    /// A WebSocket echo exchange with the http-server's /ws.
    WsEcho {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 3)]
        messages: usize,
    },
    /// Opens many connections and holds them (flood.rs).
    Flood(flood::FloodArgs),
    /// Open-loop load (wrk2-style): GET / at a fixed `rate` per second for `duration_ms`,
    /// over `connections` keep-alive connections. Request i is due at start + i/rate, and its
    /// latency is measured from when it was due, not from when a connection was free to
    /// send it, so a slow server shows in the latency instead of lowering the offered load
    /// (no coordinated omission). Prints the achieved rate and latency percentiles.
    HttpLoad {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// Connects to an echo server every `interval_ms` until `stop_file` exists (`limit_ms`
    /// at most) and counts each connection as captured by the proxy, direct (capture
    /// lapsed), refused (EPERM) or failed; prints the counts.
    CaptureWatch {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        stop_file: std::path::PathBuf,
        #[arg(long, default_value_t = 120_000)]
        limit_ms: u64,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// For the connect and for the echo of each connection.
        #[arg(long, default_value_t = 2_000)]
        timeout_ms: u64,
    },
    /// Asks an agent's handoff socket for its listeners as a successor would, without taking
    /// over; prints what it got (`listeners`, `refused` with the reason, `closed`,
    /// `unreachable`), its uid and effective capabilities.
    HandoffProbe {
        #[arg(long)]
        socket: std::path::PathBuf,
    },
    /// Keep-alive HTTP/1.1 GETs over `concurrency` connections; prints latency percentiles.
    HttpBench {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        requests: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CloseMode {
    Rst,
    Normal,
}

/// One port or an inclusive range `a-b`.
#[derive(Clone, Debug)]
struct PortSpec(Vec<u16>);

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

fn flatten(ports: &[PortSpec]) -> Vec<u16> {
    ports.iter().flat_map(|p| p.0.iter().copied()).collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Pause = cli.command {
        loop {
            std::thread::park();
        }
    }
    if let Cmd::ConnectLoop {
        target,
        count,
        echo_bytes,
        close,
    } = cli.command
    {
        return connect_loop(target, count, echo_bytes, close);
    }
    if let Cmd::CaptureWatch {
        target,
        stop_file,
        limit_ms,
        interval_ms,
        timeout_ms,
    } = cli.command
    {
        return capture_watch::run(&capture_watch::Watch {
            target,
            stop_file: &stop_file,
            limit: Duration::from_millis(limit_ms),
            interval: Duration::from_millis(interval_ms),
            step_timeout: Duration::from_millis(timeout_ms),
        });
    }
    if let Cmd::HandoffProbe { socket } = &cli.command {
        return handoff_probe::run(socket);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::EchoServer { ports } => echo_server(&flatten(&ports)).await,
        Cmd::EchoClient {
            target,
            bytes,
            connections,
            timeout_ms,
        } => {
            echo_client(
                target,
                bytes,
                connections,
                Duration::from_millis(timeout_ms),
            )
            .await
        }
        Cmd::ConnectMany {
            target_ip,
            ports,
            connections,
            bytes,
            timeout_ms,
        } => {
            connect_many(
                target_ip,
                &flatten(&ports),
                connections,
                bytes,
                Duration::from_millis(timeout_ms),
            )
            .await
        }
        Cmd::Flood(args) => flood::run(&args).await,
        Cmd::Soak {
            target,
            long_lived,
            duration_ms,
            until_file,
            interval_ms,
            http_target,
        } => {
            let end = soak::SoakEnd {
                deadline: tokio::time::Instant::now() + Duration::from_millis(duration_ms),
                until_file,
            };
            soak::run(
                target,
                long_lived,
                end,
                Duration::from_millis(interval_ms),
                http_target,
            )
            .await
        }
        Cmd::CaLoad {
            ca,
            server_name,
            trust_bundle,
            token_file,
            pod,
            pod_uid,
            requests,
            concurrency,
        } => {
            let pod = (pod.as_str(), pod_uid.as_str());
            let load = ca_load::Load::new(ca, &server_name, &trust_bundle, &token_file, pod)?;
            load.run(requests, concurrency).await
        }
        Cmd::HttpServer {
            port,
            body_bytes,
            name,
            fail_status,
            delay_ms,
        } => {
            let behaviour = http_app::Behaviour {
                fail_status,
                delay: Duration::from_millis(delay_ms),
            };
            http_app::serve(port, body_bytes, name, behaviour).await
        }
        Cmd::BannerServer { port } => banner_server(port).await,
        Cmd::OtlpReceiver { port, out } => http_app::otlp_receiver(port, &out).await,
        Cmd::ReadBanner { target, timeout_ms } => {
            read_banner(target, Duration::from_millis(timeout_ms)).await
        }
        Cmd::HttpGet {
            target,
            path,
            count,
            headers,
            timeout_ms,
        } => {
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                        .with_context(|| format!("--header {h:?} is not name:value"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            http_app::get_many(
                target,
                &path,
                count,
                &headers,
                Duration::from_millis(timeout_ms),
            )
            .await
        }
        Cmd::GrpcCall { target, message } => http_app::grpc_call(target, &message).await,
        Cmd::H2cServer { port } => h2c::server(port).await,
        Cmd::H2cSmuggle {
            target,
            upgrade_path,
            smuggled_path,
        } => h2c::smuggle(target, &upgrade_path, &smuggled_path).await,
        Cmd::WsEcho { url, messages } => http_app::websocket_echo_client(&url, messages).await,
        Cmd::HttpLoad {
            target,
            rate,
            duration_ms,
            connections,
        } => {
            http_load(
                target,
                rate,
                Duration::from_millis(duration_ms),
                connections,
            )
            .await
        }
        Cmd::HttpBench {
            target,
            requests,
            concurrency,
            timeout_ms,
        } => {
            http_bench(
                target,
                requests,
                concurrency,
                Duration::from_millis(timeout_ms),
            )
            .await
        }
        Cmd::Pause
        | Cmd::ConnectLoop { .. }
        | Cmd::CaptureWatch { .. }
        | Cmd::HandoffProbe { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// A dual-stack listener on `[::]:port` (IPV6_V6ONLY off, so IPv4 clients reach it too).
fn listen_dual_stack(port: u16) -> anyhow::Result<TcpListener> {
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

async fn echo_server(ports: &[u16]) -> anyhow::Result<()> {
    let mut accepters = JoinSet::new();
    for &port in ports {
        let listener = listen_dual_stack(port)?;
        accepters.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(echo_connection(stream));
                    }
                    Err(error) => eprintln!("echo-server: accept on {port}: {error}"),
                }
            }
        });
    }
    eprintln!("echo-server: listening on [::] ports {ports:?}");
    while accepters.join_next().await.is_some() {}
    Ok(())
}

async fn echo_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.split();
    // Echo until the client's EOF, then close our side too.
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
    let _ = writer.shutdown().await;
}

/// A payload unique to connection `index`, so crossed connections are caught.
fn pattern(index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| ((j * 131 + index * 7919 + (j >> 8)) % 251) as u8)
        .collect()
}

/// Why one connection failed.
enum Failure {
    PeerMismatch(String),
    /// A socket call failed: what was being done, and the error.
    Io(String, std::io::Error),
    /// What did not finish in time.
    TimedOut(String),
    Other(String),
}

impl Failure {
    fn message(&self) -> String {
        match self {
            Failure::PeerMismatch(message) | Failure::Other(message) => message.clone(),
            Failure::Io(doing, error) => format!("{doing}: {error}"),
            Failure::TimedOut(doing) => format!("{doing}: timed out"),
        }
    }

    /// The kind of failure, to count failures by: `eperm` (refused by the connect hook's
    /// fail mode), `reset`, `connection_refused`, `timed_out`, `peer_mismatch`, `io`
    /// (another error of a socket call) or `other` (a wrong or short echo, say).
    fn kind(&self) -> &'static str {
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
async fn exchange(stream: TcpStream, payload: &[u8], timeout: Duration) -> Result<(), Failure> {
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
struct Tally {
    ok: usize,
    failed: usize,
    peer_mismatch: usize,
    errors: Vec<String>,
}

impl Tally {
    fn record(&mut self, label: &str, outcome: Result<(), Failure>) {
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

    fn finish(self, connections: usize, extra: serde_json::Value) -> anyhow::Result<()> {
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

async fn echo_client(
    target: SocketAddr,
    bytes: usize,
    connections: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    for index in 0..connections {
        let payload = pattern(index, bytes);
        let outcome = async {
            let stream = connect_checked(target, timeout).await?;
            exchange(stream, &payload, timeout).await
        }
        .await;
        tally.record(&format!("connection {index}"), outcome);
    }
    tally.finish(connections, json!({}))
}

/// The payload of connect-many connection `index`: its index and port, repeated to `len` bytes.
pub(crate) fn tagged_payload(index: usize, port: u16, len: usize) -> Vec<u8> {
    let tag = format!("conn={index:06};port={port:05};");
    tag.bytes().cycle().take(len).collect()
}

async fn connect_many(
    ip: IpAddr,
    ports: &[u16],
    connections: usize,
    bytes: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    if ports.is_empty() {
        bail!("no ports");
    }
    // Phase 1: every connection is opened (and checked) before any data moves.
    let mut connecting = JoinSet::new();
    for index in 0..connections {
        let target = SocketAddr::new(ip, ports[index % ports.len()]);
        connecting.spawn(async move { (index, target, connect_checked(target, timeout).await) });
    }
    let mut tally = Tally::default();
    let mut open = Vec::new();
    while let Some(joined) = connecting.join_next().await {
        let (index, target, outcome) = joined.context("a connect task panicked")?;
        match outcome {
            Ok(stream) => open.push((index, target, stream)),
            Err(failure) => tally.record(&format!("connection {index} to {target}"), Err(failure)),
        }
    }
    let connected = open.len();
    // Phase 2 (all are open at once now): each echoes a payload naming its index and port.
    let mut exchanging = JoinSet::new();
    for (index, target, stream) in open {
        exchanging.spawn(async move {
            let payload = tagged_payload(index, target.port(), bytes);
            (index, target, exchange(stream, &payload, timeout).await)
        });
    }
    while let Some(joined) = exchanging.join_next().await {
        let (index, target, outcome) = joined.context("an echo task panicked")?;
        tally.record(&format!("connection {index} to {target}"), outcome);
    }
    tally.finish(connections, json!({ "connected": connected }))
}

fn connect_loop(
    target: SocketAddr,
    count: u64,
    echo_bytes: usize,
    close: CloseMode,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let domain = Domain::for_address(target);
    let payload = vec![0x5a_u8; echo_bytes];
    let mut echoed = vec![0_u8; echo_bytes];
    let start = Instant::now();
    for i in 0..count {
        let socket = Socket::new(domain, Type::STREAM, None).context("socket")?;
        if let CloseMode::Rst = close {
            socket
                .set_linger(Some(Duration::ZERO))
                .context("SO_LINGER 0")?;
        }
        socket
            .connect_timeout(&target.into(), Duration::from_secs(5))
            .with_context(|| format!("connect {i} to {target}"))?;
        if echo_bytes > 0 {
            let mut stream = std::net::TcpStream::from(socket);
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .context("SO_RCVTIMEO")?;
            stream
                .write_all(&payload)
                .with_context(|| format!("send {i}"))?;
            stream
                .read_exact(&mut echoed)
                .with_context(|| format!("echo {i}"))?;
            anyhow::ensure!(echoed == payload, "echo {i} differs from what was sent");
        } else {
            drop(socket);
        }
    }
    let elapsed = start.elapsed();
    let elapsed_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    println!(
        "{}",
        json!({
            "count": count,
            "elapsed_ns": elapsed_ns,
            "per_connect_ns": elapsed_ns.checked_div(count).unwrap_or(0),
        })
    );
    Ok(())
}

async fn http_load(
    target: SocketAddr,
    rate: u64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<()> {
    if rate == 0 || connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let request = Arc::new(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: nodemesh-workload\r\n\r\n")
            .into_bytes(),
    );
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Connections are opened before the clock starts.
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        streams.push(BufReader::new(stream));
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut workers = JoinSet::new();
    for mut reader in streams {
        let (request, next) = (Arc::clone(&request), Arc::clone(&next));
        workers.spawn(async move {
            let (mut line, mut body) = (String::new(), Vec::new());
            let (mut latencies, mut failed) = (Vec::new(), 0u64);
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= total {
                    break;
                }
                let due = start + interval * u32::try_from(index).unwrap_or(u32::MAX);
                tokio::time::sleep_until(due).await;
                match one_request(&mut reader, &request, &mut line, &mut body).await {
                    Ok(_) => latencies.push(due.elapsed()),
                    Err(_) => {
                        failed += 1;
                        match TcpStream::connect(target).await {
                            Ok(stream) => reader = BufReader::new(stream),
                            Err(_) => break,
                        }
                    }
                }
            }
            (latencies, failed)
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failed = 0u64;
    while let Some(joined) = workers.join_next().await {
        let (mut done, worker_failed) = joined.context("a load worker panicked")?;
        latencies.append(&mut done);
        failed += worker_failed;
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let percentile = |p: f64| percentile_us(&latencies, p);
    println!(
        "{}",
        json!({
            "offered_rps": rate,
            "achieved_rps": latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            "requests": total,
            "ok": latencies.len(),
            "failed": failed,
            "p50_us": percentile(0.50),
            "p99_us": percentile(0.99),
            "p999_us": percentile(0.999),
        })
    );
    Ok(())
}

/// The banner a `banner-server` writes first.
const BANNER: &[u8] = b"220 nodemesh-workload banner\r\n";

async fn banner_server(port: u16) -> anyhow::Result<()> {
    let listener = listen_dual_stack(port)?;
    eprintln!("banner-server: listening on [::]:{port}");
    loop {
        let (mut stream, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if stream.write_all(BANNER).await.is_ok() {
                echo_connection(stream).await;
            }
        });
    }
}

async fn read_banner(target: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        let connected = started.elapsed();
        let mut banner = vec![0u8; BANNER.len()];
        stream
            .read_exact(&mut banner)
            .await
            .context("reading the banner")?;
        anyhow::Ok((connected, banner))
    };
    let (connected, banner) = tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("no banner within {timeout:?}"))??;
    if banner != BANNER {
        bail!("unexpected banner {:?}", String::from_utf8_lossy(&banner));
    }
    println!(
        "{}",
        json!({
            "connect_ms": connected.as_secs_f64() * 1e3,
            "banner_ms": started.elapsed().as_secs_f64() * 1e3,
        })
    );
    Ok(())
}

/// Sends one GET on a keep-alive connection and reads the whole response.
/// The `p` quantile of sorted `latencies` in µs by nearest rank: the smallest latency with
/// at least `p` of all at or below it (0 when there are none).
pub(crate) fn percentile_us(latencies: &[Duration], p: f64) -> f64 {
    if latencies.is_empty() {
        return 0.0;
    }
    let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
    latencies[rank - 1].as_secs_f64() * 1e6
}

/// The connection closed (or failed) before any byte of the response arrived.
#[derive(Debug)]
struct ClosedBeforeResponse;

impl std::fmt::Display for ClosedBeforeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection closed before the response")
    }
}

impl std::error::Error for ClosedBeforeResponse {}

/// Whether the connection may carry another request.
enum Reply {
    KeepAlive,
    Close,
}

async fn one_request(
    reader: &mut BufReader<TcpStream>,
    request: &[u8],
    line: &mut String,
    body: &mut Vec<u8>,
) -> anyhow::Result<Reply> {
    if reader.get_mut().write_all(request).await.is_err() {
        return Err(ClosedBeforeResponse.into());
    }
    line.clear();
    match reader.read_line(line).await {
        Ok(0) | Err(_) => return Err(ClosedBeforeResponse.into()),
        Ok(_) => {}
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    if status != "200" {
        bail!("status line {:?}", line.trim());
    }
    let mut content_length = None;
    let mut reply = Reply::KeepAlive;
    loop {
        line.clear();
        if reader.read_line(line).await.context("reading headers")? == 0 {
            bail!("connection closed in the headers");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse::<usize>().ok();
            }
            if name.trim().eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                reply = Reply::Close;
            }
        }
    }
    let length = content_length.context("no Content-Length")?;
    body.resize(length, 0);
    reader.read_exact(body).await.context("reading the body")?;
    Ok(reply)
}

async fn http_bench(
    target: SocketAddr,
    requests: usize,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let concurrency = concurrency.clamp(1, requests.max(1));
    let request = Arc::new(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: nodemesh-workload\r\n\r\n")
            .into_bytes(),
    );
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let share = requests / concurrency + usize::from(worker < requests % concurrency);
        let request = Arc::clone(&request);
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(share);
            let outcome: anyhow::Result<()> = async {
                let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
                    .await
                    .context("connect timed out")?
                    .with_context(|| format!("connecting to {target}"))?;
                stream.set_nodelay(true)?;
                let mut reader = BufReader::new(stream);
                let (mut line, mut body) = (String::new(), Vec::new());
                for _ in 0..share {
                    let sent = Instant::now();
                    tokio::time::timeout(
                        timeout,
                        one_request(&mut reader, &request, &mut line, &mut body),
                    )
                    .await
                    .context("request timed out")??;
                    latencies.push(sent.elapsed());
                }
                Ok(())
            }
            .await;
            (
                latencies,
                outcome.err().map(|e| format!("worker {worker}: {e:#}")),
            )
        });
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut errors = Vec::new();
    while let Some(joined) = workers.join_next().await {
        let (mut done, error) = joined.context("a bench worker panicked")?;
        latencies.append(&mut done);
        errors.extend(error);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let percentile = |p: f64| percentile_us(&latencies, p);
    let summary = json!({
        "requests": requests,
        "ok": latencies.len(),
        "failed": requests - latencies.len(),
        "concurrency": concurrency,
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
        "p999_us": percentile(0.999),
        // For a CDF: the latency at each percent, and at 99.5, 99.9 and 100.
        "cdf_us": (1..=99)
            .map(|q| f64::from(q) / 100.0)
            .chain([0.995, 0.999, 1.0])
            .map(|q| [q, percentile(q)])
            .collect::<Vec<_>>(),
        "rps": latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        "errors": errors.iter().take(MAX_ERRORS).collect::<Vec<_>>(),
    });
    println!("{summary}");
    if latencies.len() != requests {
        bail!(
            "{} of {requests} requests failed",
            requests - latencies.len()
        );
    }
    Ok(())
}
