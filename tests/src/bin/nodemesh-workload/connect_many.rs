//! `connect-many`: opens all connections at once (round-robin over the ports), then echoes
//! on each a payload that names its connection and port.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::task::JoinSet;

use crate::connection::{PortSpec, Tally, connect_checked, exchange, flatten, tagged_payload};

#[derive(clap::Args)]
pub struct ConnectManyArgs {
    #[arg(long)]
    target_ip: IpAddr,
    #[arg(long, value_delimiter = ',', required = true)]
    ports: Vec<PortSpec>,
    #[arg(long, default_value_t = 200)]
    connections: usize,
    #[arg(long, default_value_t = 64)]
    bytes: usize,
    #[arg(long, default_value_t = 20_000)]
    timeout_ms: u64,
}

pub async fn run(args: &ConnectManyArgs) -> anyhow::Result<()> {
    let (ip, ports, connections, bytes) = (
        args.target_ip,
        flatten(&args.ports),
        args.connections,
        args.bytes,
    );
    let timeout = Duration::from_millis(args.timeout_ms);
    if ports.is_empty() {
        bail!("no ports");
    }
    // Phase 1: every connection is opened (and checked) before any data moves.
    let mut connecting = JoinSet::new();
    for index in 0..connections {
        let target = SocketAddr::new(ip, ports[index % ports.len()]);
        connecting.spawn(async move { (index, target, connect_checked(target, timeout).await) });
    }
    let mut tally = Tally::default();
    let mut open = Vec::new();
    while let Some(joined) = connecting.join_next().await {
        let (index, target, outcome) = joined.context("a connect task panicked")?;
        match outcome {
            Ok(stream) => open.push((index, target, stream)),
            Err(failure) => tally.record(&format!("connection {index} to {target}"), Err(failure)),
        }
    }
    let connected = open.len();
    // Phase 2 (all are open at once now): each echoes a payload naming its index and port.
    let mut exchanging = JoinSet::new();
    for (index, target, stream) in open {
        exchanging.spawn(async move {
            let payload = tagged_payload(index, target.port(), bytes);
            (index, target, exchange(stream, &payload, timeout).await)
        });
    }
    while let Some(joined) = exchanging.join_next().await {
        let (index, target, outcome) = joined.context("an echo task panicked")?;
        tally.record(&format!("connection {index} to {target}"), outcome);
    }
    tally.finish(connections, json!({ "connected": connected }))
}
