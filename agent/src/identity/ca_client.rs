//! The agent's client of the nodemesh CA: one HTTPS request per certificate, and the request
//! and answer both sides speak (the CA, `crate::ca::server`, decodes what this encodes).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// `POST /v1/certificates`'s body: the pod the agent asks a certificate for, and its CSR.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub namespace: String,
    pub pod: String,
    /// The UID of the pod the agent enrolled (absent from agents older than the CA).
    #[serde(default)]
    pub uid: Option<String>,
    pub csr: String,
}

/// The CA's answer to a `SignRequest`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    pub spiffe_id: String,
    /// Leaf then intermediate, PEM.
    pub certificate_chain: String,
    pub not_after_unix: u64,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("reading the CA token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("connecting to the CA at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "TLS with the CA at {addr} (is the trust bundle the CA's root, and --ca-server-name right?): {source}"
    )]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP with the CA at {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("the CA at {addr} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("the CA refused ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the CA's answer is not valid JSON: {0}")]
    Decode(serde_json::Error),
}

/// The token in `path`, trimmed; an error if unreadable or empty.
pub fn read_token(path: &Path) -> Result<String, CaClientError> {
    let token = std::fs::read_to_string(path)
        .map_err(|source| CaClientError::Token {
            path: path.to_owned(),
            source,
        })?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(CaClientError::EmptyToken(path.to_owned()));
    }
    Ok(token)
}

pub struct CaClient {
    /// `host:port`, resolved at each request (the CA's Service name in a cluster).
    addr: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token_file: PathBuf,
}

impl CaClient {
    pub fn new(
        addr: String,
        server_name: ServerName<'static>,
        tls: rustls::ClientConfig,
        token_file: PathBuf,
    ) -> Self {
        Self {
            addr,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            token_file,
        }
    }

    pub async fn sign(&self, request: &SignRequest) -> Result<SignResponse, CaClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.sign_once(request))
            .await
            .map_err(|_| CaClientError::Timeout {
                addr: self.addr.clone(),
            })?
    }

    async fn sign_once(&self, request: &SignRequest) -> Result<SignResponse, CaClientError> {
        // The kubelet rotates projected tokens: use the current one.
        let token = read_token(&self.token_file)?;
        let addr = || self.addr.clone();
        let tcp = TcpStream::connect(self.addr.as_str())
            .await
            .map_err(|source| CaClientError::Connect {
                addr: addr(),
                source,
            })?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| CaClientError::Tls {
                addr: addr(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|source| CaClientError::Http {
                addr: addr(),
                source,
            })?;
        tokio::spawn(connection);
        let body = serde_json::to_vec(request).map_err(CaClientError::Decode)?;
        let http_request = Request::post("/v1/certificates")
            .header(hyper::header::HOST, "nodemesh-ca")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CaClientError::Refused {
                status: StatusCode::BAD_REQUEST,
                message: e.to_string(),
            })?;
        let response =
            sender
                .send_request(http_request)
                .await
                .map_err(|source| CaClientError::Http {
                    addr: addr(),
                    source,
                })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| CaClientError::Http {
                addr: addr(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CaClientError::Refused { status, message });
        }
        serde_json::from_slice(&bytes).map_err(CaClientError::Decode)
    }
}
