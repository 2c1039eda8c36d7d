//! `http-bench`: keep-alive HTTP/1.1 GETs over `concurrency` connections, closed loop;
//! prints latency percentiles and a CDF.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::{io::BufReader, net::TcpStream, task::JoinSet};

use crate::{
    connection::MAX_ERRORS,
    http_client::{get_root, one_request, percentile_us},
};

#[derive(clap::Args)]
pub struct HttpBenchArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    requests: usize,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

pub async fn run(args: &HttpBenchArgs) -> anyhow::Result<()> {
    let HttpBenchArgs {
        target,
        requests,
        concurrency,
        timeout_ms,
    } = *args;
    let timeout = Duration::from_millis(timeout_ms);
    let concurrency = concurrency.clamp(1, requests.max(1));
    let request = Arc::new(get_root(target));
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
