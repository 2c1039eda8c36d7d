//! The HTTP/1.1 client side the load modes share: one GET on a keep-alive connection, and
//! latency percentiles.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

/// `GET /` to `target`, as the load modes send it.
pub(crate) fn get_root(target: std::net::SocketAddr) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: nodemesh-workload\r\n\r\n")
        .into_bytes()
}

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
pub(crate) struct ClosedBeforeResponse;

impl std::fmt::Display for ClosedBeforeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection closed before the response")
    }
}

impl std::error::Error for ClosedBeforeResponse {}

/// Whether the connection may carry another request.
pub(crate) enum Reply {
    KeepAlive,
    Close,
}

/// Sends one GET on a keep-alive connection and reads the whole response.
pub(crate) async fn one_request(
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
