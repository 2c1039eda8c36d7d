//! `grpc-server` and `grpc-client`: a real gRPC server and client (tonic, protobuf messages
//! by prost) for the gRPC and GRPCRoute tests; the http-server answers its gRPC calls with
//! the same service (`answer`). The service is `nodemesh.test.Echo` with two unary
//! methods, `Say` (echoes the message) and `Shout` (echoes it upper-cased); every reply names
//! the server that answered, the method and the `x-route` header it received, so a test sees
//! where each call was routed and what the route's filters did.
//!
//! The service is declared by hand, as tonic-build would generate it from a two-method
//! `.proto`: the messages are prost structs, the server a `tower::Service` that hands each
//! method to tonic's `server::Grpc` with prost's codec, the client tonic's `client::Grpc`.
//! No protoc, no build script; the gRPC framing, HTTP/2 and trailers are all tonic's.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use tonic::{
    codegen::{BoxFuture, Service, http, tokio_stream},
    server::{Grpc, NamedService, UnaryService},
};
use tonic_prost::ProstCodec;

/// The service's full name, the first element of every method's path.
const SERVICE: &str = "nodemesh.test.Echo";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub server: String,
    #[prost(string, tag = "3")]
    pub method: String,
    /// The `x-route` request header as the server got it ("" when absent).
    #[prost(string, tag = "4")]
    pub route_header: String,
}

#[derive(clap::Args)]
pub struct GrpcServerArgs {
    #[arg(long)]
    port: u16,
    /// Named in every reply.
    #[arg(long)]
    name: String,
}

#[derive(clap::Args)]
pub struct GrpcClientArgs {
    /// `host:port` of the server or Service.
    #[arg(long)]
    target: SocketAddr,
    /// `Say` or `Shout`.
    #[arg(long, default_value = "Say")]
    method: String,
    #[arg(long, default_value_t = 1)]
    calls: usize,
    /// Request metadata `name=value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
}

/// The server side of `nodemesh.test.Echo`, as generated code would route it.
#[derive(Clone)]
struct EchoServer {
    name: Arc<str>,
}

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .filter(|m| *m == "Say" || *m == "Shout")
            .map(str::to_owned);
        let Some(method) = method else {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("no such method").into_http())
            });
        };
        let call = Method {
            server: Arc::clone(&self.name),
            method,
        };
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            Ok(grpc.unary(call, request).await)
        })
    }
}

/// One method of the server.
struct Method {
    server: Arc<str>,
    method: String,
}

impl UnaryService<EchoRequest> for Method {
    type Response = EchoReply;
    type Future = BoxFuture<tonic::Response<EchoReply>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let route_header = request
            .metadata()
            .get("x-route")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let message = request.into_inner().message;
        let reply = EchoReply {
            message: if self.method == "Shout" {
                message.to_uppercase()
            } else {
                message
            },
            server: self.server.to_string(),
            method: self.method.clone(),
            route_header,
        };
        Box::pin(async move { Ok(tonic::Response::new(reply)) })
    }
}

pub async fn server(args: &GrpcServerArgs) -> anyhow::Result<()> {
    let listener = crate::connection::listen_dual_stack(args.port)?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    eprintln!(
        "grpc-server {}: listening on [::]:{} ({SERVICE})",
        args.name, args.port
    );
    tonic::transport::Server::builder()
        .add_service(EchoServer {
            name: Arc::from(args.name.as_str()),
        })
        .serve_with_incoming(incoming)
        .await
        .context("serving gRPC")
}

/// Makes `calls` calls on one channel; prints how many succeeded, the status codes of the
/// others, and the servers, methods and `x-route` values of the replies, counted.
pub async fn client(args: &GrpcClientArgs) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.target))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.target))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let path: http::uri::PathAndQuery = format!("/{SERVICE}/{}", args.method)
        .parse()
        .context("method path")?;
    let mut headers = Vec::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once('=')
            .with_context(|| format!("{header:?} is not name=value"))?;
        let name: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = name
            .parse()
            .with_context(|| format!("metadata name {name:?}"))?;
        let value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = value
            .parse()
            .with_context(|| format!("metadata value {value:?}"))?;
        headers.push((name, value));
    }
    let mut ok = 0;
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut servers: BTreeMap<String, usize> = BTreeMap::new();
    let mut route_headers: BTreeMap<String, usize> = BTreeMap::new();
    let mut messages: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..args.calls {
        let mut request = tonic::Request::new(EchoRequest {
            message: "hello grpc".into(),
        });
        for (name, value) in &headers {
            request.metadata_mut().insert(name.clone(), value.clone());
        }
        grpc.ready().await.context("channel ready")?;
        let codec = ProstCodec::<EchoRequest, EchoReply>::default();
        match grpc.unary(request, path.clone(), codec).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                ok += 1;
                *servers.entry(reply.server).or_default() += 1;
                *route_headers.entry(reply.route_header).or_default() += 1;
                *messages
                    .entry(format!("{}: {}", reply.method, reply.message))
                    .or_default() += 1;
            }
            Err(status) => {
                *statuses.entry(format!("{:?}", status.code())).or_default() += 1;
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "calls": args.calls,
            "ok": ok,
            "failed_statuses": statuses,
            "servers": servers,
            "route_headers": route_headers,
            "replies": messages,
        })
    );
    if ok == args.calls {
        Ok(())
    } else {
        anyhow::bail!("{} of {} calls failed", args.calls - ok, args.calls)
    }
}

/// The http-server's gRPC calls (`content-type: application/grpc`): answered by the same
/// tonic service, named `server`, its reply collected (unary) into the http-server's body
/// type with the trailers tonic wrote.
pub async fn answer(
    server: &str,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<BoxBody<Bytes, Infallible>> {
    let mut service = EchoServer {
        name: Arc::from(server),
    };
    let response = match service.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            let mut frames = vec![Ok(Frame::data(collected.to_bytes()))];
            frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
            frames
        }
        Err(status) => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
            vec![Ok(Frame::trailers(trailers))]
        }
    };
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    http::Response::from_parts(parts, body)
}
