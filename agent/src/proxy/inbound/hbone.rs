//! HBONE server: the listener on port 15008 inside each meshed pod's network namespace.
//! It terminates mTLS with that pod's certificate, requires a client certificate from the
//! mesh's trust bundle and trust domain, and serves HTTP/2 CONNECT streams whose authority is
//! one of this pod's own addresses, delivering each to the application from inside the pod.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    admission::Admission,
    context::{DestinationPod, InboundContext},
};
use crate::{
    identity::{spiffe::SpiffeId, tls},
    proxy::{
        hbone::{
            HBONE_SERVER_MAX_STREAMS, MAX_HEADER_LIST, RESET_STREAMS_KEPT,
            SERVER_CONNECTION_WINDOW, SERVER_SEND_BUFFER, SERVER_STREAM_WINDOW,
            connect::connect_target, stream::TunnelStream,
        },
        limits,
        listener::accept_loop,
    },
};

pub async fn serve(listener: TcpListener, pod: Arc<DestinationPod>, ctx: Arc<InboundContext>) {
    let name = pod.display_name.clone();
    accept_loop(listener, "HBONE", &name, &ctx.drain, |stream, peer| {
        let (pod, ctx) = (Arc::clone(&pod), Arc::clone(&ctx));
        serve_connection(stream, peer, pod, ctx)
    })
    .await
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
) {
    // Small HTTP/2 frames (a CONNECT's 200, a short reply) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let Some(handshake) = pod.handshakes.try_acquire(&peer.ip()) else {
        limits::refuse(
            &stream,
            pod.handshakes.budget(),
            &pod.display_name,
            &ctx.metrics,
        );
        return;
    };
    let Some(certificate) = ctx.identities.certificate(&pod.identity) else {
        tracing::warn!(pod = %pod.display_name, %peer, "HBONE refused: this pod holds no valid certificate (none issued yet, or expired without renewal: is the CA reachable?)");
        return;
    };
    let config = match certificate
        .tls_material()
        .and_then(|(chain, key)| tls::hbone_server_config(chain, key, Arc::clone(&ctx.roots)))
    {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(pod = %pod.display_name, %error, "HBONE TLS configuration");
            return;
        }
    };
    let accept = TlsAcceptor::from(Arc::new(config)).accept(stream);
    let tls = match tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // No client certificate, another CA, expired, garbage: all end here.
            tracing::warn!(pod = %pod.display_name, %peer, %error, "HBONE mTLS handshake rejected");
            return;
        }
        Err(_) => {
            tracing::warn!(pod = %pod.display_name, %peer, timeout = ?limits::HANDSHAKE_TIMEOUT, "HBONE mTLS handshake not completed in time; closed");
            return;
        }
    };
    drop(handshake);
    let peer_id = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(tls::spiffe_id_of)
    {
        Some(Ok(id)) if id.trust_domain() == ctx.trust_domain => id,
        Some(Ok(id)) => {
            tracing::warn!(pod = %pod.display_name, %peer, peer_id = %id, "HBONE rejected: peer from another trust domain");
            return;
        }
        Some(Err(error)) => {
            tracing::warn!(pod = %pod.display_name, %peer, %error, "HBONE rejected: peer certificate has no usable SPIFFE ID");
            return;
        }
        None => return,
    };
    let drain = ctx.drain.clone();
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(HBONE_SERVER_MAX_STREAMS)
        .initial_window_size(SERVER_STREAM_WINDOW)
        .initial_connection_window_size(SERVER_CONNECTION_WINDOW)
        .max_send_buffer_size(SERVER_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_reset_streams(RESET_STREAMS_KEPT)
        .handshake::<_, Bytes>(tls);
    let connection = match tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "HBONE: no HTTP/2 connection");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HBONE: no HTTP/2 preface in time; closed");
            return;
        }
    };
    let streams = Streams {
        connection,
        on_stream: move |request, respond| {
            let (pod, ctx, peer_id) = (Arc::clone(&pod), Arc::clone(&ctx), peer_id.clone());
            tokio::spawn(handle_connect(request, respond, pod, ctx, peer_id, peer));
        },
    };
    // Draining sends GOAWAY: source nodes open their next tunnels to the successor, and
    // this connection ends when its last tunnel does.
    if let Err(error) = drain
        .serve_until_drained(streams, |streams| {
            streams.get_mut().connection.graceful_shutdown();
        })
        .await
    {
        tracing::debug!(%peer, %error, "HBONE connection ended");
    }
}

/// An HBONE connection's driver: accepts its streams, each handed to `on_stream`, until
/// the connection ends.
struct Streams<F> {
    connection: h2::server::Connection<TlsStream<TcpStream>, Bytes>,
    on_stream: F,
}

impl<F: FnMut(Request<RecvStream>, SendResponse<Bytes>) + Unpin> Future for Streams<F> {
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match std::task::ready!(this.connection.poll_accept(cx)) {
                Some(Ok((request, respond))) => (this.on_stream)(request, respond),
                Some(Err(error)) => return Poll::Ready(Err(error)),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Answers one CONNECT stream: refused with a status, or accepted and relayed.
async fn handle_connect(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    pod: Arc<DestinationPod>,
    ctx: Arc<InboundContext>,
    peer_id: SpiffeId,
    peer: SocketAddr,
) {
    let refused = |respond: &mut SendResponse<Bytes>, code: StatusCode| {
        if let Err(error) = respond.send_response(status(code), true) {
            tracing::debug!(%peer, %error, "HBONE: the refusal could not be sent");
        }
    };
    if request.method() != Method::CONNECT {
        tracing::warn!(pod = %pod.display_name, %peer_id, method = %request.method(), "HBONE: only CONNECT is served");
        return refused(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = connect_target(request.uri()) else {
        tracing::warn!(pod = %pod.display_name, %peer_id, uri = %request.uri(), "HBONE: CONNECT authority is not ip:port");
        return refused(&mut respond, StatusCode::BAD_REQUEST);
    };
    if !pod.ips.contains(&target.ip()) {
        tracing::warn!(pod = %pod.display_name, %peer_id, %target, "HBONE: CONNECT to an address that is not this meshed pod");
        return refused(&mut respond, StatusCode::FORBIDDEN);
    }
    let admission = Admission {
        pod,
        ctx,
        peer_id,
        client: peer.ip(),
        target,
    };
    // A client that resets the stream meanwhile (a rapid reset) takes its connection to
    // the application, and its tunnel slot, with it at once.
    let admitted = tokio::select! {
        // Admission first: a refusal is logged and counted even when the reset is there too.
        biased;
        admitted = admission.admit() => match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => return refused(&mut respond, refusal.status()),
        },
        reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(%peer, %target, ?reason, "HBONE: the client reset the CONNECT before the application accepted");
            return;
        }
    };
    match respond.send_response(status(StatusCode::OK), false) {
        // The relay gets a task of its own, sized to what it holds while the tunnel lives
        // (docs/benchmarks.md, memory per idle connection), and this one ends.
        Ok(send) => {
            tokio::spawn(admitted.serve(TunnelStream::new(send, request.into_body())));
        }
        Err(error) => {
            // The client reset the stream: the application's connection is reset too.
            tracing::info!(%peer, %error, "HBONE: the CONNECT's answer could not be sent");
            admitted.abandon();
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    response
}
