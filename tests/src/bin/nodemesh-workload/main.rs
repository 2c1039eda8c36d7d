//! `nodemesh-workload`: the real TCP (and UDP, `udp.rs`) programs the testbed runs inside
//! pods.
//!
//! Servers listen dual-stack on `[::]`; clients verify every byte they get back and that
//! `getpeername()` reports the address they dialled, print one JSON summary line on stdout,
//! and exit 0 only if everything checked out.
//!
//! This file is the command line and its dispatch; each mode is a module of its own (a
//! server and its own client share one), over `connection` (checked connections, the
//! dual-stack listener) and `http_client` (one keep-alive GET, percentiles).

mod banner;
mod ca_load;
mod capture_watch;
mod connect_loop;
mod connect_many;
mod connection;
mod echo_client;
mod echo_server;
mod flood;
mod grpc;
mod h2c;
mod handoff_probe;
mod http_app;
mod http_bench;
mod http_client;
mod http_load;
mod soak;
mod static_keys;
mod udp;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    EchoServer(echo_server::EchoServerArgs),
    /// Send a pattern over each connection, check getpeername and the byte-exact echo.
    EchoClient(echo_client::EchoClientArgs),
    /// Open all connections at once (round-robin over the ports), then echo on each.
    ConnectMany(connect_many::ConnectManyArgs),
    /// N sequential connect()+close(); prints the time per connect.
    ConnectLoop(connect_loop::ConnectLoopArgs),
    /// For `duration_ms` (and then until `until_file` exists, when given): `long_lived`
    /// connections that each exchange a tagged chunk every `interval_ms` and check its echo,
    /// then half-close and expect a clean close, while a loop opens short connections (64-byte
    /// echo, close) back to back. Prints counts; fails if anything failed.
    Soak(soak::SoakArgs),
    /// Load on `nodemesh ca serve` as agents make it: per request a new key pair, a CSR, a
    /// new TLS connection and a POST; `concurrency` requests in flight. Prints the rate and
    /// latency percentiles.
    CaLoad(ca_load::CaLoadArgs),
    /// Minimal HTTP/1.1 keep-alive server answering 200 with a fixed body.
    HttpServer(http_app::HttpServerArgs),
    /// An OTLP/HTTP collector stand-in: appends every POSTed body as one line to `--out`.
    OtlpReceiver(http_app::OtlpReceiverArgs),
    /// A server-speaks-first server: writes a banner line on accept, then echoes.
    BannerServer(banner::BannerServerArgs),
    /// Connects, sends nothing, and reads the server's first line; prints how long it took.
    ReadBanner(banner::ReadBannerArgs),
    /// GETs on one keep-alive connection; prints statuses and servers (x-served-by) counted.
    HttpGet(http_app::HttpGetArgs),
    /// A server that honours `Upgrade: h2c` (101, then HTTP/2 on the connection); every
    /// answer names the path and protocol it was served on.
    H2cServer(h2c::H2cServerArgs),
    /// h2c smuggling: `GET upgrade_path` asking for h2c; once switched, `smuggled_path` over
    /// HTTP/2. Prints the statuses; fails if the smuggled request is not answered 200.
    H2cSmuggle(h2c::H2cSmuggleArgs),
    /// A gRPC server (tonic) of `nodemesh.test.Echo` (grpc.rs).
    GrpcServer(grpc::GrpcServerArgs),
    /// Unary calls with tonic's client to `nodemesh.test.Echo`; prints who answered what.
    GrpcClient(grpc::GrpcClientArgs),
    /// A WebSocket echo exchange with the http-server's /ws.
    WsEcho(http_app::WsEchoArgs),
    /// Opens many connections and holds them (flood.rs).
    Flood(flood::FloodArgs),
    /// Open-loop load (wrk2-style): GET / at a fixed `rate` per second for `duration_ms`,
    /// over `connections` keep-alive connections. Request i is due at start + i/rate, and its
    /// latency is measured from when it was due, not from when a connection was free to
    /// send it, so a slow server shows in the latency instead of lowering the offered load
    /// (no coordinated omission). Prints the achieved rate and latency percentiles.
    HttpLoad(http_load::HttpLoadArgs),
    /// Connects to an echo server every `interval_ms` until `stop_file` exists (`limit_ms`
    /// at most) and counts each connection as captured by the proxy, direct (capture
    /// lapsed), refused (EPERM) or failed; prints the counts.
    CaptureWatch(capture_watch::CaptureWatchArgs),
    /// Asks an agent's handoff socket for its listeners as a successor would, without taking
    /// over; prints what it got (`listeners`, `refused` with the reason, `closed`,
    /// `unreachable`), its uid and effective capabilities.
    HandoffProbe(handoff_probe::HandoffProbeArgs),
    /// Keep-alive HTTP/1.1 GETs over `concurrency` connections; prints latency percentiles.
    HttpBench(http_bench::HttpBenchArgs),
    /// UDP echo on `port`, logging every datagram received.
    UdpEcho(udp::UdpEchoArgs),
    /// One datagram to `target`; prints the reply or `no reply`.
    UdpSend(udp::UdpSendArgs),
    /// One DNS query (A) with `sendto` on an unconnected socket; prints the answer's source
    /// address and port and its first A record.
    DnsAsk(udp::DnsAskArgs),
    /// DNS queries (A) back to back on a connected socket; prints the rate and latency
    /// percentiles.
    DnsLoad(udp::DnsLoadArgs),
    /// A resolver on port 53 that holds each query until a file exists, then answers.
    DnsHeld(udp::DnsHeldArgs),
    /// For the kernel-matrix VMs: keeps one idle attachment of each BPF hook the agent uses,
    /// so the kernel never live-patches those hooks' static keys while tests run
    /// (static_keys.rs); returns once they are held, holding them in the background.
    HoldStaticKeys(static_keys::HoldStaticKeysArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The modes that need no runtime: blocking sockets, or nothing at all.
    match &cli.command {
        Cmd::Pause => loop {
            std::thread::park();
        },
        Cmd::ConnectLoop(args) => return connect_loop::run(args),
        Cmd::CaptureWatch(args) => return capture_watch::run_args(args),
        Cmd::HandoffProbe(args) => return handoff_probe::run(args),
        Cmd::UdpEcho(args) => return udp::echo(args),
        Cmd::UdpSend(args) => return udp::send(args),
        Cmd::DnsAsk(args) => return udp::ask(args),
        Cmd::DnsHeld(args) => return udp::held(args),
        Cmd::DnsLoad(args) => return udp::load(args),
        Cmd::HoldStaticKeys(args) => return static_keys::run(args),
        _ => {}
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
        Cmd::EchoServer(args) => echo_server::run(&args).await,
        Cmd::EchoClient(args) => echo_client::run(&args).await,
        Cmd::ConnectMany(args) => connect_many::run(&args).await,
        Cmd::Flood(args) => flood::run(&args).await,
        Cmd::Soak(args) => soak::run_args(args).await,
        Cmd::CaLoad(args) => ca_load::run_args(&args).await,
        Cmd::HttpServer(args) => http_app::serve_args(args).await,
        Cmd::BannerServer(args) => banner::server(&args).await,
        Cmd::OtlpReceiver(args) => http_app::otlp_receiver(&args).await,
        Cmd::ReadBanner(args) => banner::read(&args).await,
        Cmd::HttpGet(args) => http_app::get_args(&args).await,
        Cmd::GrpcServer(args) => grpc::server(&args).await,
        Cmd::GrpcClient(args) => grpc::client(&args).await,
        Cmd::H2cServer(args) => h2c::server(&args).await,
        Cmd::H2cSmuggle(args) => h2c::smuggle(&args).await,
        Cmd::WsEcho(args) => http_app::websocket_echo_client(&args).await,
        Cmd::HttpLoad(args) => http_load::run(&args).await,
        Cmd::HttpBench(args) => http_bench::run(&args).await,
        Cmd::Pause
        | Cmd::ConnectLoop(_)
        | Cmd::CaptureWatch(_)
        | Cmd::HandoffProbe(_)
        | Cmd::UdpEcho(_)
        | Cmd::UdpSend(_)
        | Cmd::DnsAsk(_)
        | Cmd::DnsHeld(_)
        | Cmd::DnsLoad(_)
        | Cmd::HoldStaticKeys(_) => {
            unreachable!("handled before the runtime starts")
        }
    }
}
