//! `banner-server` and `read-banner`: a server-speaks-first protocol. The server writes a
//! banner line naming itself on accept, then echoes; the client connects, sends nothing,
//! and reads it (on as many connections as asked, counting which server answered each).

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
    /// The name the banner gives.
    #[arg(long, default_value = "nodemesh-workload")]
    name: String,
}

#[derive(clap::Args)]
pub struct ReadBannerArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Connections, one after the other.
    #[arg(long, default_value_t = 1)]
    count: u32,
}

/// How a banner starts (an SMTP greeting); the server's name follows.
const GREETING: &str = "220 ";

pub async fn server(args: &BannerServerArgs) -> anyhow::Result<()> {
    let port = args.port;
    let listener = listen_dual_stack(port)?;
    let banner: &'static [u8] = format!("{GREETING}{}\r\n", args.name).leak().as_bytes();
    eprintln!("banner-server: listening on [::]:{port}");
    loop {
        let (mut stream, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if stream.write_all(banner).await.is_ok() {
                echo_connection(stream).await;
            }
        });
    }
}

/// One connection: how long connecting and the banner took, and the server's name.
async fn read_one(target: SocketAddr, timeout: Duration) -> anyhow::Result<(f64, f64, String)> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        let connected = started.elapsed();
        let mut banner = Vec::new();
        while !banner.ends_with(b"\r\n") {
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .context("reading the banner")?;
            banner.push(byte[0]);
            if banner.len() > 512 {
                bail!("no banner line in 512 bytes");
            }
        }
        anyhow::Ok((connected, banner))
    };
    let (connected, banner) = tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("no banner within {timeout:?}"))??;
    let line = String::from_utf8_lossy(&banner);
    let Some(name) = line.trim_end().strip_prefix(GREETING) else {
        bail!("unexpected banner {line:?}");
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(connected), ms(started.elapsed()), name.to_owned()))
}

pub async fn read(args: &ReadBannerArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut servers = std::collections::BTreeMap::<String, u32>::new();
    let (mut connect_ms, mut banner_ms, mut server) = (0.0, 0.0, String::new());
    for _ in 0..args.count.max(1) {
        (connect_ms, banner_ms, server) = read_one(args.target, timeout).await?;
        *servers.entry(server.clone()).or_default() += 1;
    }
    println!(
        "{}",
        json!({
            "connect_ms": connect_ms,
            "banner_ms": banner_ms,
            "server": server,
            "servers": servers,
        })
    );
    Ok(())
}
