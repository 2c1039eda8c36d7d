//! `connect-loop`: N sequential connect()+close() (blocking sockets, no runtime); prints
//! the time per connect, overall and for each thousand in turn (whether the rate holds as
//! connections accumulate).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::ValueEnum;
use serde_json::json;
use socket2::{Domain, Socket, Type};

#[derive(clap::Args)]
pub struct ConnectLoopArgs {
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
}

#[derive(Clone, Copy, ValueEnum)]
enum CloseMode {
    Rst,
    Normal,
}

pub fn run(args: &ConnectLoopArgs) -> anyhow::Result<()> {
    let ConnectLoopArgs {
        target,
        count,
        echo_bytes,
        close,
    } = *args;
    use std::io::{Read, Write};
    let domain = Domain::for_address(target);
    let payload = vec![0x5a_u8; echo_bytes];
    let mut echoed = vec![0_u8; echo_bytes];
    let start = Instant::now();
    let mut thousand_start = start;
    let mut per_thousand_ns = Vec::new();
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
        if (i + 1) % 1000 == 0 {
            let now = Instant::now();
            per_thousand_ns.push(nanos(now - thousand_start) / 1000);
            thousand_start = now;
        }
    }
    let elapsed_ns = nanos(start.elapsed());
    println!(
        "{}",
        json!({
            "count": count,
            "elapsed_ns": elapsed_ns,
            "per_connect_ns": elapsed_ns.checked_div(count).unwrap_or(0),
            "per_connect_ns_by_thousand": per_thousand_ns,
        })
    );
    Ok(())
}

fn nanos(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}
