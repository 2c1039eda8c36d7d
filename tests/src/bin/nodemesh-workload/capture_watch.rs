//! `capture-watch`: connections made one after the other while the mesh changes under them
//! (an agent restarts, hands over, meets a node it did not expect), each classified by how it
//! went, so that a test can tell whether capture ever lapsed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;

#[derive(clap::Args)]
pub struct CaptureWatchArgs {
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
}

/// The watch `args` describe.
pub fn run_args(args: &CaptureWatchArgs) -> anyhow::Result<()> {
    run(&Watch {
        target: args.target,
        stop_file: &args.stop_file,
        limit: Duration::from_millis(args.limit_ms),
        interval: Duration::from_millis(args.interval_ms),
        step_timeout: Duration::from_millis(args.timeout_ms),
    })
}

/// What each connection sends and expects echoed.
const PROBE: &[u8; 16] = b"capture-watch-16";

/// How the connections went, printed as one JSON line at the end.
#[derive(Default, Serialize)]
struct Outcomes {
    /// Through the proxy: the socket's local end is the loopback of the proxy's listener in
    /// the pod (a captured socket reports it, see docs/datapath.md), and the echo came back.
    captured: u64,
    /// Straight to the destination: the local end is the pod's own address. Capture lapsed.
    direct: u64,
    /// connect() failed with EPERM: the fail mode (`closed`) refused it.
    refused: u64,
    /// Anything else: a reset, a timeout, a wrong echo through the proxy.
    failed: u64,
    errors: Vec<String>,
}

enum Outcome {
    Captured,
    Direct,
    Refused,
    Failed(String),
}

/// How the watch runs.
pub struct Watch<'a> {
    pub target: SocketAddr,
    /// It stops once this file exists...
    pub stop_file: &'a Path,
    /// ...or after this long.
    pub limit: Duration,
    /// Between two connections.
    pub interval: Duration,
    /// For the connect, and for the echo.
    pub step_timeout: Duration,
}

/// Connects to `target` every `interval` until `stop_file` exists (or `limit` has passed),
/// then prints the outcomes.
pub fn run(watch: &Watch<'_>) -> anyhow::Result<()> {
    let Watch {
        target,
        stop_file,
        limit,
        interval,
        step_timeout,
    } = *watch;
    let deadline = Instant::now() + limit;
    let mut outcomes = Outcomes::default();
    while !stop_file.exists() && Instant::now() < deadline {
        match attempt(target, step_timeout) {
            Outcome::Captured => outcomes.captured += 1,
            Outcome::Direct => outcomes.direct += 1,
            Outcome::Refused => outcomes.refused += 1,
            Outcome::Failed(error) => {
                outcomes.failed += 1;
                if outcomes.errors.len() < crate::connection::MAX_ERRORS {
                    outcomes.errors.push(error);
                }
            }
        }
        // Pacing, so the watch does not become a connection flood.
        std::thread::sleep(interval);
    }
    println!("{}", serde_json::to_string(&outcomes)?);
    Ok(())
}

fn attempt(target: SocketAddr, step_timeout: Duration) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&target, step_timeout) {
        Ok(stream) => stream,
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => return Outcome::Refused,
        Err(error) => return Outcome::Failed(format!("connect: {error}")),
    };
    let captured = match stream.local_addr() {
        Ok(local) => local.ip().is_loopback(),
        Err(error) => return Outcome::Failed(format!("getsockname: {error}")),
    };
    if !captured {
        // Whatever the echo does, this connection escaped the mesh.
        return Outcome::Direct;
    }
    let echoed = (|| {
        stream.set_read_timeout(Some(step_timeout))?;
        stream.write_all(PROBE)?;
        let mut back = [0u8; PROBE.len()];
        stream.read_exact(&mut back)?;
        Ok::<_, std::io::Error>(back)
    })();
    match echoed {
        Ok(back) if &back == PROBE => Outcome::Captured,
        Ok(_) => Outcome::Failed("echo differs".to_owned()),
        Err(error) => Outcome::Failed(format!("echo: {error}")),
    }
}
