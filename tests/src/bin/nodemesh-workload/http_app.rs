//! The HTTP application the L7 tests and benchmarks run in pods, and its clients.
//!
//! The server speaks HTTP/1.1 and HTTP/2 (prior knowledge) on one port and names itself in
//! `x-served-by` on every response:
//! - `/echo…`: a JSON reflection of the request (method, path, query, headers);
//! - `/status/<code>`: that status;
//! - `/delay/<ms>`: 200 after the delay;
//! - `/flaky/<key>`: 503 the first time a key is seen, 200 after;
//! - `/ws` with `Upgrade: websocket`: a WebSocket echo;
//! - `content-type: application/grpc`: the tonic `nodemesh.test.Echo` service of grpc.rs;
//! - anything else: a fixed body of `--body-bytes` bytes (the benchmark's request).
//!
//! With `--fail-status`, every request gets that status instead (a failing endpoint); with
//! `--delay-ms`, every response waits (a slow endpoint).

use std::{
    collections::{BTreeMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use crate::connection::listen_dual_stack;

type Body = BoxBody<Bytes, Infallible>;

#[derive(clap::Args)]
pub struct HttpServerArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Sent back in `x-served-by`.
    #[arg(long, default_value = "http-server")]
    name: String,
    /// Answer every request with this status (a failing endpoint).
    #[arg(long)]
    fail_status: Option<u16>,
    /// Delay every response by this much (a slow endpoint).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[derive(clap::Args)]
pub struct OtlpReceiverArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(clap::Args)]
pub struct HttpGetArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// `name:value`, repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(clap::Args)]
pub struct WsEchoArgs {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 3)]
    messages: usize,
}

/// The server `args` describe.
pub async fn serve_args(args: HttpServerArgs) -> anyhow::Result<()> {
    let behaviour = Behaviour {
        fail_status: args.fail_status,
        delay: Duration::from_millis(args.delay_ms),
    };
    serve(args.port, args.body_bytes, args.name, behaviour).await
}

/// The GETs `args` describe.
pub async fn get_args(args: &HttpGetArgs) -> anyhow::Result<()> {
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("--header {h:?} is not name:value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    get_many(
        args.target,
        &args.path,
        args.count,
        &headers,
        Duration::from_millis(args.timeout_ms),
    )
    .await
}

/// How a server misbehaves on purpose.
pub struct Behaviour {
    /// Every request gets this status.
    pub fail_status: Option<u16>,
    /// Every response waits this long.
    pub delay: Duration,
}

struct App {
    name: String,
    fail_status: Option<StatusCode>,
    delay: Duration,
    body: Bytes,
    flaky_seen: Mutex<HashSet<String>>,
}

async fn serve(
    port: u16,
    body_bytes: usize,
    name: String,
    behaviour: Behaviour,
) -> anyhow::Result<()> {
    let listener = listen_dual_stack(port)?;
    let fail_status = behaviour
        .fail_status
        .map(StatusCode::from_u16)
        .transpose()
        .context("--fail-status")?;
    let app = Arc::new(App {
        name,
        fail_status,
        delay: behaviour.delay,
        body: Bytes::from(vec![b'x'; body_bytes]),
        flaky_seen: Mutex::default(),
    });
    eprintln!(
        "http-server {}: listening on [::]:{port} (HTTP/1.1 and h2c)",
        app.name
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("http-server: accept: {error}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(respond(&app, request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(app: &App, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let mut response = if let Some(status) = app.fail_status {
        full(status, format!("failing with {status} on purpose\n"))
    } else if is_grpc(request.headers()) {
        crate::grpc::answer(&app.name, request).await
    } else if path == "/ws" && request.headers().contains_key(header::UPGRADE) {
        websocket_echo(request)
    } else if path.starts_with("/echo") {
        let headers: BTreeMap<String, Vec<String>> = request
            .headers()
            .keys()
            .map(|name| {
                let values = request
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                (name.as_str().to_owned(), values)
            })
            .collect();
        let reflection = json!({
            "server": app.name,
            "method": request.method().as_str(),
            "path": path,
            "query": request.uri().query(),
            "version": format!("{:?}", request.version()),
            "headers": headers,
        });
        full(StatusCode::OK, reflection.to_string())
    } else if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        full(status, format!("status {code}\n"))
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        full(StatusCode::OK, format!("delayed {ms} ms\n"))
    } else if let Some(key) = path.strip_prefix("/flaky/") {
        let first = app
            .flaky_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned());
        if first {
            full(
                StatusCode::SERVICE_UNAVAILABLE,
                "flaky: first attempt fails\n".into(),
            )
        } else {
            full(StatusCode::OK, "flaky: later attempts succeed\n".into())
        }
    } else {
        Response::new(Full::new(app.body.clone()).boxed())
    };
    if let Ok(name) = HeaderValue::from_str(&app.name) {
        response.headers_mut().insert("x-served-by", name);
    }
    response
}

fn full(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn websocket_echo(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return full(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key\n".into());
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            if message.is_text() || message.is_binary() {
                if socket.send(message).await.is_err() {
                    break;
                }
            } else if message.is_close() {
                break;
            }
        }
    });
    let mut response = full(StatusCode::SWITCHING_PROTOCOLS, String::new());
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert("sec-websocket-accept", accept);
    }
    response
}

/// `count` GETs of `path` on one keep-alive HTTP/1.1 connection to `target`; prints the
/// statuses and the servers that answered.
async fn get_many(
    target: SocketAddr,
    path: &str,
    count: usize,
    headers: &[(String, String)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(connection);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut servers: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    for _ in 0..count {
        let mut request = Request::get(path).header(header::HOST, target.to_string());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(http_body_util::Empty::<Bytes>::new())
            .context("building the request")?;
        let exchange = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let server = response
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>((status, server))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((status, server))) => {
                *statuses.entry(status).or_default() += 1;
                *servers.entry(server).or_default() += 1;
            }
            Ok(Err(error)) => {
                errors.push(error.to_string());
                break;
            }
            Err(_) => {
                errors.push(format!("no response within {timeout:?}"));
                break;
            }
        }
    }
    println!(
        "{}",
        json!({"statuses": statuses, "servers": servers, "errors": errors})
    );
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{} request(s) failed: {}", errors.len(), errors[0])
    }
}

/// Opens a WebSocket to `url` through whatever is at its address, sends `messages` text
/// messages and checks each comes back.
pub async fn websocket_echo_client(args: &WsEchoArgs) -> anyhow::Result<()> {
    let (url, messages) = (args.url.as_str(), args.messages);
    let uri: hyper::Uri = url.parse().context("the URL")?;
    let authority = uri.authority().context("the URL has no host")?.as_str();
    let addr: SocketAddr = authority
        .parse()
        .context("the URL's host must be ip:port")?;
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut socket, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .context("WebSocket handshake")?;
    for i in 0..messages {
        let text = format!("message {i}");
        socket.send(Message::text(text.clone())).await?;
        match socket.next().await {
            Some(Ok(Message::Text(echoed))) if echoed.as_str() == text => {}
            other => bail!("message {i}: expected the echo, got {other:?}"),
        }
    }
    socket.close(None).await.ok();
    println!(
        "{}",
        json!({"status": response.status().as_u16(), "echoed": messages})
    );
    Ok(())
}

/// Accepts OTLP/HTTP exports and appends each body, as one line, to `out`; answers 200.
pub async fn otlp_receiver(args: &OtlpReceiverArgs) -> anyhow::Result<()> {
    let (port, out) = (args.port, args.out.as_path());
    let listener = listen_dual_stack(port)?;
    let out = Arc::new(out.to_owned());
    eprintln!(
        "otlp-receiver: listening on [::]:{port}, writing to {}",
        out.display()
    );
    loop {
        let (stream, _) = listener.accept().await.context("accept")?;
        let out = Arc::clone(&out);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let out = Arc::clone(&out);
                async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut line = body.to_vec();
                    line.retain(|b| *b != b'\n');
                    line.push(b'\n');
                    use std::io::Write;
                    let written = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(out.as_path())
                        .and_then(|mut file| file.write_all(&line));
                    let status = if written.is_ok() {
                        StatusCode::OK
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    };
                    Ok::<_, Infallible>(full(status, String::new()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
