//! `echo-client`: sends a pattern over each connection, one after another, and checks
//! getpeername() and the byte-exact echo.

use std::{net::SocketAddr, time::Duration};

use serde_json::json;

use crate::connection::{Tally, connect_checked, exchange, pattern};

#[derive(clap::Args)]
pub struct EchoClientArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    bytes: usize,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Per-connection time limit.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

pub async fn run(args: &EchoClientArgs) -> anyhow::Result<()> {
    let EchoClientArgs {
        target,
        bytes,
        connections,
        timeout_ms,
    } = *args;
    let timeout = Duration::from_millis(timeout_ms);
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
