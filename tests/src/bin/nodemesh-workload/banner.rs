//! `banner-server` and `read-banner`: a server-speaks-first protocol. The server writes a
//! banner line on accept, then echoes; the client connects, sends nothing, and reads it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{connection::listen_dual_stack, echo_server::echo_connection};

#[derive(clap::Args)]
pub struct BannerServerArgs {
    #[arg(long)]
    port: u16,
}

#[derive(clap::Args)]
pub struct ReadBannerArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

/// The banner a `banner-server` writes first.
const BANNER: &[u8] = b"220 nodemesh-workload banner\r\n";

pub async fn server(args: &BannerServerArgs) -> anyhow::Result<()> {
    let port = args.port;
    let listener = listen_dual_stack(port)?;
    eprintln!("banner-server: listening on [::]:{port}");
    loop {
        let (mut stream, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if stream.write_all(BANNER).await.is_ok() {
                echo_connection(stream).await;
            }
        });
    }
}

pub async fn read(args: &ReadBannerArgs) -> anyhow::Result<()> {
    let (target, timeout) = (args.target, Duration::from_millis(args.timeout_ms));
    let started = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        let connected = started.elapsed();
        let mut banner = vec![0u8; BANNER.len()];
        stream
            .read_exact(&mut banner)
            .await
            .context("reading the banner")?;
        anyhow::Ok((connected, banner))
    };
    let (connected, banner) = tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("no banner within {timeout:?}"))??;
    if banner != BANNER {
        bail!("unexpected banner {:?}", String::from_utf8_lossy(&banner));
    }
    println!(
        "{}",
        json!({
            "connect_ms": connected.as_secs_f64() * 1e3,
            "banner_ms": started.elapsed().as_secs_f64() * 1e3,
        })
    );
    Ok(())
}
