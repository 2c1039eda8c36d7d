//! The L7 proxy: HTTP/1.1 and HTTP/2 connections to Services, detected on their first bytes,
//! served per request with hyper: HTTPRoute rules, a backend by weight, an endpoint by the
//! balancer, sent over pooled upstream connections (HBONE to meshed pods).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::request::{self, ClientConnection};
use crate::proxy::http::serve_requests;

/// Serves HTTP requests on `stream` until the client closes it.
pub async fn serve<S>(stream: S, connection: ClientConnection)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = connection.protocol;
    let drain = connection.ctx.drain.clone();
    let connection = Arc::new(connection);
    let handler = move |request| {
        let connection = Arc::clone(&connection);
        async move { request::handle(request, &connection).await }
    };
    if let Err(error) = serve_requests(stream, protocol, &drain, handler).await {
        tracing::debug!(%error, "HTTP client connection ended with an error");
    }
}
