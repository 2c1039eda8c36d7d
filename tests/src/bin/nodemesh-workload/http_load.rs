//! `http-load`: open-loop load (wrk2-style) at a fixed rate over keep-alive connections.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::{io::BufReader, net::TcpStream, task::JoinSet};

use crate::http_client::{get_root, one_request, percentile_us};

#[derive(clap::Args)]
pub struct HttpLoadArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    rate: u64,
    #[arg(long)]
    duration_ms: u64,
    #[arg(long, default_value_t = 16)]
    connections: usize,
}

pub async fn run(args: &HttpLoadArgs) -> anyhow::Result<()> {
    let HttpLoadArgs {
        target,
        rate,
        duration_ms,
        connections,
    } = *args;
    let duration = Duration::from_millis(duration_ms);
    if rate == 0 || connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let request = Arc::new(get_root(target));
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
