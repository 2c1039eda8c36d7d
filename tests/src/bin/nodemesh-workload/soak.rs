//! `soak`: short connections back to back, long-lived ones exchanging all along, and
//! keep-alive HTTP requests, for as long as a test changes the mesh under them.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Context;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    task::JoinSet,
};

use crate::{
    connection::{Failure, Tally, connect_checked, exchange, tagged_payload},
    http_client::{ClosedBeforeResponse, Reply, one_request},
};

#[derive(clap::Args)]
pub struct SoakArgs {
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
}

/// The soak `args` describe, from now.
pub async fn run_args(args: SoakArgs) -> anyhow::Result<()> {
    let end = SoakEnd {
        deadline: tokio::time::Instant::now() + Duration::from_millis(args.duration_ms),
        until_file: args.until_file,
    };
    run(
        args.target,
        args.long_lived,
        end,
        Duration::from_millis(args.interval_ms),
        args.http_target,
    )
    .await
}

/// The outcomes of a sequence of attempts, as runs of the same kind.
#[derive(Default)]
struct OutcomeRuns {
    runs: Vec<(&'static str, usize)>,
}

impl OutcomeRuns {
    fn record(&mut self, kind: &'static str) {
        match self.runs.last_mut() {
            Some((last, count)) if *last == kind => *count += 1,
            _ => self.runs.push((kind, 1)),
        }
    }

    fn failure_kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for &(kind, count) in self.runs.iter().filter(|(kind, _)| *kind != "ok") {
            *kinds.entry(kind).or_default() += count;
        }
        kinds
    }
}

/// When a soak ends: at its deadline, or later, once its `until_file` exists.
#[derive(Clone)]
pub struct SoakEnd {
    pub deadline: tokio::time::Instant,
    pub until_file: Option<std::path::PathBuf>,
}

impl SoakEnd {
    fn reached(&self) -> bool {
        tokio::time::Instant::now() >= self.deadline
            && self.until_file.as_ref().is_none_or(|file| file.exists())
    }
}

/// See `Cmd::Soak`. Besides the counts, the summary has the outcome of every short
/// connection in order, as runs of one kind (`short_outcomes`: `[["ok", 812], ["reset", 1],
/// ["eperm", 40], ["ok", 700]]`), and the failures of each kind over all of them
/// (`short_failure_kinds`): the error messages quoted are only the first few.
pub async fn run(
    target: SocketAddr,
    long_lived: usize,
    end: SoakEnd,
    interval: Duration,
    http_target: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(5);
    let http = http_target.map(|target| tokio::spawn(http_soak(target, end.clone(), timeout)));
    let mut tasks = JoinSet::new();
    for index in 0..long_lived {
        let end = end.clone();
        tasks.spawn(async move {
            let stream = connect_checked(target, timeout).await?;
            let (mut reader, mut writer) = stream.into_split();
            let mut exchanges = 0usize;
            while !end.reached() {
                let chunk = tagged_payload(exchanges, index as u16, 1024);
                let mut echoed = vec![0u8; chunk.len()];
                let round = async {
                    writer.write_all(&chunk).await?;
                    reader.read_exact(&mut echoed).await.map(|_| ())
                };
                tokio::time::timeout(timeout, round)
                    .await
                    .map_err(|_| Failure::Other(format!("long-lived {index}: echo timed out")))?
                    .map_err(|e| {
                        Failure::Other(format!("long-lived {index} exchange {exchanges}: {e}"))
                    })?;
                if echoed != chunk {
                    return Err(Failure::Other(format!(
                        "long-lived {index} exchange {exchanges}: echo differs"
                    )));
                }
                exchanges += 1;
                tokio::time::sleep(interval).await;
            }
            // Still whole at the end: our half-close reaches the server, and its close
            // comes back with nothing after the last echo.
            let close = async {
                writer.shutdown().await?;
                let mut rest = Vec::new();
                reader.read_to_end(&mut rest).await.map(|_| rest)
            };
            match tokio::time::timeout(timeout, close).await {
                Ok(Ok(rest)) if rest.is_empty() => Ok::<_, Failure>(exchanges),
                Ok(Ok(rest)) => Err(Failure::Other(format!(
                    "long-lived {index}: {} unexpected bytes after the last echo",
                    rest.len()
                ))),
                Ok(Err(e)) => Err(Failure::Other(format!("long-lived {index}: closing: {e}"))),
                Err(_) => Err(Failure::Other(format!(
                    "long-lived {index}: the close was not echoed within {timeout:?}"
                ))),
            }
        });
    }
    let mut tally = Tally::default();
    let mut short = 0usize;
    let mut outcomes = OutcomeRuns::default();
    while !end.reached() {
        let payload = tagged_payload(short, target.port(), 64);
        let outcome = match connect_checked(target, timeout).await {
            Ok(stream) => exchange(stream, &payload, timeout).await,
            Err(error) => Err(error),
        };
        outcomes.record(outcome.as_ref().map_or_else(Failure::kind, |_| "ok"));
        tally.record(&format!("short connection {short}"), outcome);
        short += 1;
    }
    let mut exchanges = Vec::with_capacity(long_lived);
    let mut long_failed = 0usize;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a long-lived task panicked")? {
            Ok(count) => {
                exchanges.push(count);
                tally.record("long-lived connection", Ok(()));
            }
            Err(error) => {
                long_failed += 1;
                tally.record("long-lived connection", Err(error));
            }
        }
    }
    let failed_short = tally.failed - long_failed;
    let mut http_summary = HttpSoak::default();
    if let Some(http) = http {
        http_summary = http.await.context("the HTTP loop panicked")?;
        for (index, error) in http_summary.errors.iter().enumerate() {
            tally.record(
                &format!("HTTP error {index}"),
                Err(Failure::Other(error.clone())),
            );
        }
    }
    tally.finish(
        short + long_lived + http_summary.errors.len(),
        json!({
            "http_requests": http_summary.requests,
            "http_reconnects": http_summary.reconnects,
            "http_failed": http_summary.errors.len(),
            "short_connections": short,
            "short_failed": failed_short,
            "short_failure_kinds": outcomes.failure_kinds(),
            "short_outcomes": outcomes.runs,
            "long_lived": long_lived,
            "long_lived_failed": long_failed,
            "long_lived_exchanges": exchanges.iter().sum::<usize>(),
            "long_lived_exchanges_each": exchanges,
        }),
    )
}

#[derive(Default)]
pub struct HttpSoak {
    requests: usize,
    reconnects: usize,
    errors: Vec<String>,
}

/// Keep-alive GETs back to back until the soak's `end` (see `Cmd::Soak`).
async fn http_soak(target: SocketAddr, end: SoakEnd, timeout: Duration) -> HttpSoak {
    let request =
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: nodemesh-workload\r\n\r\n")
            .into_bytes();
    let mut soak = HttpSoak::default();
    let mut connection: Option<BufReader<TcpStream>> = None;
    let (mut line, mut body) = (String::new(), Vec::new());
    let mut retried = false;
    while !end.reached() {
        let reader = match &mut connection {
            Some(reader) => reader,
            None => match connect_checked(target, timeout).await {
                Ok(stream) => connection.insert(BufReader::new(stream)),
                Err(failure) => {
                    soak.errors
                        .push(format!("request {}: {}", soak.requests, failure.message()));
                    soak.requests += 1;
                    continue;
                }
            },
        };
        let outcome =
            tokio::time::timeout(timeout, one_request(reader, &request, &mut line, &mut body))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        match outcome {
            Ok(Reply::KeepAlive) => {}
            Ok(Reply::Close) => connection = None,
            Err(error) if error.is::<ClosedBeforeResponse>() && !retried => {
                // A stale keep-alive connection: send the request again on a new one.
                soak.reconnects += 1;
                connection = None;
                retried = true;
                continue;
            }
            Err(error) => {
                soak.errors
                    .push(format!("request {}: {error:#}", soak.requests));
                connection = None;
            }
        }
        retried = false;
        soak.requests += 1;
    }
    soak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_kept_in_order_as_runs_and_counted_by_kind() {
        let mut outcomes = OutcomeRuns::default();
        for kind in ["ok", "ok", "reset", "eperm", "eperm", "eperm", "ok"] {
            outcomes.record(kind);
        }
        assert_eq!(
            outcomes.runs,
            [("ok", 2), ("reset", 1), ("eperm", 3), ("ok", 1)]
        );
        assert_eq!(
            outcomes.failure_kinds(),
            BTreeMap::from([("eperm", 3), ("reset", 1)])
        );
    }
}
