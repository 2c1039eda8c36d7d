//! GETs against the agent's admin API (loopback, plain text or JSON), with hyper's HTTP/1
//! client on a small runtime of its own: the CLI commands are synchronous.

use std::{future::Future, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, body::Bytes, header::HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long connecting may take; the agent is on this node, so this is generous.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take, from connecting to the last byte of the body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the nodemesh agent's admin API at {addr}: {source} (is the agent running on this node? --admin sets the address)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path} from {addr}: no answer within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        path: String,
        timeout: Duration,
    },
    #[error("{path} from {addr}: {source}")]
    Http {
        addr: SocketAddr,
        path: String,
        source: hyper::Error,
    },
    #[error("{path} from {addr}: answered {status}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: StatusCode,
    },
    #[error("{path} is not a request path: {source}")]
    Path {
        path: String,
        source: hyper::http::Error,
    },
    #[error("starting the admin client's runtime: {0}")]
    Runtime(std::io::Error),
}

/// An answer: its status and its body (lossily UTF-8).
#[derive(Debug)]
pub struct AdminResponse {
    pub status: StatusCode,
    pub body: String,
}

/// A client of one agent's admin API.
pub struct AdminClient {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> Result<Self, AdminError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AdminError::Runtime)?;
        Ok(Self { addr, runtime })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// GETs `path`, whatever its status (`/readyz` says "not ready" with 503).
    pub fn get(&self, path: &str) -> Result<AdminResponse, AdminError> {
        self.runtime.block_on(within(
            REQUEST_TIMEOUT,
            self.timeout(path),
            fetch(self.addr, path),
        ))?
    }

    /// GETs `path` and returns its body; any status but 200 is an error.
    pub fn get_ok(&self, path: &str) -> Result<String, AdminError> {
        let response = self.get(path)?;
        if response.status != StatusCode::OK {
            return Err(AdminError::Status {
                addr: self.addr,
                path: path.to_owned(),
                status: response.status,
            });
        }
        Ok(response.body)
    }

    fn timeout(&self, path: &str) -> AdminError {
        AdminError::Timeout {
            addr: self.addr,
            path: path.to_owned(),
            timeout: REQUEST_TIMEOUT,
        }
    }
}

/// `future`'s output, or `expired` if it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    expired: AdminError,
    future: impl Future<Output = Result<T, AdminError>>,
) -> Result<Result<T, AdminError>, AdminError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| expired)
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<AdminResponse, AdminError> {
    let connect_expired = AdminError::Connect {
        addr,
        source: std::io::ErrorKind::TimedOut.into(),
    };
    let stream = within(CONNECT_TIMEOUT, connect_expired, async {
        TcpStream::connect(addr)
            .await
            .map_err(|source| AdminError::Connect { addr, source })
    })
    .await??;
    let http = |source| AdminError::Http {
        addr,
        path: path.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection is driven while this request runs and dropped with the runtime's task
    // when the answer is in (or the request failed, which `send_request` reports).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(path)
        .header(HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|source| AdminError::Path {
            path: path.to_owned(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(http)?;
    Ok(AdminResponse {
        status,
        body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_listening_is_the_agent_not_running() {
        // A port of our own, closed again: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port");
        let client = AdminClient::new(addr).expect("client");
        let error = client.get("/readyz").expect_err("nothing listens");
        assert!(matches!(error, AdminError::Connect { .. }), "{error:?}");
        assert!(
            error.to_string().contains("is the agent running"),
            "{error}"
        );
    }

    #[test]
    fn a_status_other_than_ok_is_an_error_for_get_ok_and_an_answer_for_get() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let addr = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Write};
            for _ in 0..2 {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).expect("request") > 2 {
                    line.clear();
                }
                let answer =
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nnot ready\n";
                reader
                    .get_mut()
                    .write_all(answer.as_bytes())
                    .expect("answer");
            }
        });
        let client = AdminClient::new(addr).expect("client");
        let response = client.get("/readyz").expect("an answer");
        assert_eq!(
            (response.status, response.body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        );
        let error = client.get_ok("/readyz").expect_err("503");
        assert!(
            matches!(error, AdminError::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE),
            "{error:?}"
        );
        server.join().expect("server");
    }
}
