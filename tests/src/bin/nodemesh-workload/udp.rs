//! The UDP programs: an echo server that logs what it gets, a one-datagram exchange, a DNS
//! query from an unconnected socket, and a resolver that holds its answers until released.
//! Blocking sockets; DNS messages are built and parsed with hickory-proto.

use std::{
    fs::OpenOptions,
    io::Write,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

#[derive(clap::Args)]
pub struct UdpEchoArgs {
    #[arg(long)]
    port: u16,
    /// Appended with `ready`, then every datagram received (as text), one per line.
    #[arg(long)]
    log: PathBuf,
}

#[derive(clap::Args)]
pub struct UdpSendArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    payload: String,
    /// Connect the socket to the target first: the kernel then matches the reply to it
    /// before any sk_lookup program runs.
    #[arg(long)]
    connected: bool,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

#[derive(clap::Args)]
pub struct DnsAskArgs {
    /// The resolver; asked at port 53 with `sendto` on an unconnected socket.
    #[arg(long)]
    resolver: Ipv4Addr,
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

#[derive(clap::Args)]
pub struct DnsLoadArgs {
    /// The resolver, asked at port 53 on a socket connected to it (as the C library does).
    #[arg(long)]
    resolver: Ipv4Addr,
    #[arg(long)]
    name: String,
    /// How long to ask, one query at a time.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
}

#[derive(clap::Args)]
pub struct DnsHeldArgs {
    /// Appended with `ready`, `got <name>` and `answered <name>`.
    #[arg(long)]
    log: PathBuf,
    /// Each query is answered once this file exists (or `--hold-ms` has passed).
    #[arg(long)]
    release: PathBuf,
    #[arg(long, default_value_t = 6000)]
    hold_ms: u64,
    /// The address every answer gives.
    #[arg(long)]
    answer: Ipv4Addr,
}

/// Appends lines to a log file, flushed at once (the tests read it while this runs).
#[derive(Clone)]
struct Log(Arc<Mutex<std::fs::File>>);

impl Log {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(Arc::new(Mutex::new(file))))
    }

    fn line(&self, line: &str) {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(file, "{line}");
    }
}

pub fn echo(args: &UdpEchoArgs) -> anyhow::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, args.port)).context("bind")?;
    let log = Log::open(&args.log)?;
    log.line("ready");
    let mut buffer = [0u8; 2048];
    loop {
        let (len, peer) = socket.recv_from(&mut buffer).context("recv")?;
        log.line(&String::from_utf8_lossy(&buffer[..len]));
        socket.send_to(&buffer[..len], peer).context("send")?;
    }
}

/// Prints the reply, or `no reply` after the timeout.
pub fn send(args: &UdpSendArgs) -> anyhow::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind")?;
    socket.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    if args.connected {
        socket.connect(args.target).context("connect")?;
        socket.send(args.payload.as_bytes()).context("send")?;
    } else {
        socket
            .send_to(args.payload.as_bytes(), args.target)
            .context("sendto")?;
    }
    let mut buffer = [0u8; 2048];
    match socket.recv(&mut buffer) {
        Ok(len) => println!("{}", String::from_utf8_lossy(&buffer[..len])),
        Err(_) => println!("no reply"),
    }
    Ok(())
}

/// Prints `<source address> <source port> <first A record>`, or `no reply`.
pub fn ask(args: &DnsAskArgs) -> anyhow::Result<()> {
    let mut query = Message::query();
    query.metadata.id = 0x2a2a;
    query.metadata.recursion_desired = true;
    let name = Name::from_ascii(&args.name).context("name")?;
    query.add_query(Query::query(name, RecordType::A));
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind")?;
    socket.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    socket
        .send_to(&query.to_vec()?, (args.resolver, 53))
        .context("sendto")?;
    let mut buffer = [0u8; 4096];
    let Ok((len, source)) = socket.recv_from(&mut buffer) else {
        println!("no reply");
        return Ok(());
    };
    let answer = Message::from_vec(&buffer[..len]).context("parsing the answer")?;
    let address = answer.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0.to_string()),
        _ => None,
    });
    println!(
        "{} {} {}",
        source.ip(),
        source.port(),
        address.as_deref().unwrap_or("none")
    );
    Ok(())
}

/// Queries `name` back to back for the duration, one in flight; prints JSON with the
/// count, the rate and latency percentiles (µs). Fails on a lost or failed query.
pub fn load(args: &DnsLoadArgs) -> anyhow::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind")?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.connect((args.resolver, 53)).context("connect")?;
    let name = Name::from_ascii(&args.name).context("name")?;
    let mut latencies = Vec::new();
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    let duration = Duration::from_millis(args.duration_ms);
    let mut id: u16 = 0;
    while started.elapsed() < duration {
        id = id.wrapping_add(1);
        let mut query = Message::query();
        query.metadata.id = id;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name.clone(), RecordType::A));
        let bytes = query.to_vec()?;
        let sent = Instant::now();
        socket.send(&bytes).context("send")?;
        loop {
            let len = socket.recv(&mut buffer).context("no answer within 1 s")?;
            let answer = Message::from_vec(&buffer[..len]).context("parsing the answer")?;
            if answer.metadata.id != id {
                continue;
            }
            anyhow::ensure!(
                answer.metadata.response_code == ResponseCode::NoError
                    && !answer.answers.is_empty(),
                "answer without address: {:?}",
                answer.metadata.response_code
            );
            break;
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let queries = latencies.len();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((queries as f64 * q) as usize).min(queries - 1)];
    println!(
        "{}",
        serde_json::json!({
            "queries": queries,
            "qps": queries as f64 / elapsed,
            "p50_us": at(0.5),
            "p99_us": at(0.99),
        })
    );
    Ok(())
}

pub fn held(args: &DnsHeldArgs) -> anyhow::Result<()> {
    let socket = Arc::new(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53)).context("bind :53")?);
    let log = Log::open(&args.log)?;
    log.line("ready");
    let mut buffer = [0u8; 4096];
    loop {
        let (len, peer) = socket.recv_from(&mut buffer).context("recv")?;
        let Ok(query) = Message::from_vec(&buffer[..len]) else {
            continue;
        };
        let (socket, log) = (Arc::clone(&socket), log.clone());
        let (release, hold, address) = (
            args.release.clone(),
            Duration::from_millis(args.hold_ms),
            args.answer,
        );
        std::thread::spawn(move || {
            let name = query.queries.first().map(|q| q.name().to_string());
            let name = name.unwrap_or_default();
            let name = name.trim_end_matches('.');
            log.line(&format!("got {name}"));
            let deadline = Instant::now() + hold;
            while !release.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.metadata.message_type = MessageType::Response;
            reply.metadata.recursion_desired = query.metadata.recursion_desired;
            reply.metadata.recursion_available = true;
            reply.metadata.response_code = ResponseCode::NoError;
            for q in &query.queries {
                reply.add_query(q.clone());
                let data = RData::A(rdata::A(address));
                reply.add_answer(Record::from_rdata(q.name().clone(), 5, data));
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, peer);
                log.line(&format!("answered {name}"));
            }
        });
    }
}
