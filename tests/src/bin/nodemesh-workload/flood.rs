//! `flood`: opens many connections, 100 at a time, and holds those the server keeps. Each
//! is checked with a 16-byte echo, or, `--silent` or with a `--preamble-hex`, counts as held
//! if the server has not closed it within 500 ms. Writes `{"established", "refused"}` to
//! `--report` (atomically), then holds the established connections for `--hold-ms`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinSet,
};

use crate::connection::{connect_checked, tagged_payload};

#[derive(clap::Args)]
pub struct FloodArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    report: PathBuf,
    #[arg(long)]
    hold_ms: u64,
    /// Send nothing.
    #[arg(long)]
    silent: bool,
    /// Send these bytes (hex) and then nothing: a request head or a TLS record cut short.
    #[arg(long)]
    preamble_hex: Option<String>,
    /// Spread the connections round robin over this many source addresses, 127.0.0.2 and
    /// up (for a target on loopback).
    #[arg(long)]
    sources: Option<u8>,
}

pub async fn run(args: &FloodArgs) -> anyhow::Result<()> {
    let preamble = match &args.preamble_hex {
        Some(hex) => Some(decode_hex(hex)?),
        None => None,
    };
    let timeout = Duration::from_secs(5);
    let mut held = Vec::with_capacity(args.connections);
    let mut refused = 0usize;
    let mut next = 0usize;
    while next < args.connections {
        let batch = (args.connections - next).min(100);
        let mut opening = JoinSet::new();
        for index in next..next + batch {
            let source = args
                .sources
                .map(|n| Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(n.max(1))) as u8));
            let (target, silent, preamble) = (args.target, args.silent, preamble.clone());
            opening.spawn(async move {
                let mut stream = connect(target, source, timeout).await?;
                if silent || preamble.is_some() {
                    if let Some(preamble) = preamble {
                        stream.write_all(&preamble).await.ok()?;
                    }
                    let mut byte = [0u8; 1];
                    let read = stream.read(&mut byte);
                    return match tokio::time::timeout(Duration::from_millis(500), read).await {
                        Err(_still_open) => Some(stream),
                        Ok(_closed_or_reset) => None,
                    };
                }
                let payload = tagged_payload(index, target.port(), 16);
                let mut echoed = vec![0u8; payload.len()];
                let round = async {
                    stream.write_all(&payload).await?;
                    stream.read_exact(&mut echoed).await.map(|_| ())
                };
                match tokio::time::timeout(timeout, round).await {
                    Ok(Ok(())) if echoed == payload => Some(stream),
                    _ => None,
                }
            });
        }
        while let Some(joined) = opening.join_next().await {
            match joined.context("a flood task panicked")? {
                Some(stream) => held.push(stream),
                None => refused += 1,
            }
        }
        next += batch;
    }
    let summary = json!({ "established": held.len(), "refused": refused });
    let partial = args.report.with_extension("partial");
    std::fs::write(&partial, summary.to_string())
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &args.report)
        .with_context(|| format!("writing {}", args.report.display()))?;
    println!("{summary}");
    tokio::time::sleep(Duration::from_millis(args.hold_ms)).await;
    drop(held);
    Ok(())
}

async fn connect(
    target: SocketAddr,
    source: Option<Ipv4Addr>,
    timeout: Duration,
) -> Option<TcpStream> {
    let Some(source) = source else {
        return connect_checked(target, timeout).await.ok();
    };
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).ok()?;
    tokio::time::timeout(timeout, socket.connect(target))
        .await
        .ok()?
        .ok()
}

fn decode_hex(hex: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        hex.is_ascii() && hex.len().is_multiple_of(2),
        "--preamble-hex: pairs of hex digits"
    );
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .with_context(|| format!("--preamble-hex: {:?} is not hex", &hex[i..i + 2]))
        })
        .collect()
}
