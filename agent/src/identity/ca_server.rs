//! `nodemesh ca serve`: signs workload certificates over HTTPS for node agents.
//!
//! `POST /v1/certificates` with `Authorization: Bearer <agent token>` and a JSON body
//! `{"namespace", "pod", "csr"}`. The CA authenticates the token to a node, looks the pod up
//! in the cluster state, and signs only if the pod is bound to that node; the identity comes
//! from the pod's namespace and service account, never from the CSR. Every decision is logged.
//!
//! Authentication and the pod lookup are `ca_auth`'s: a Kubernetes TokenReview of the agent's
//! projected ServiceAccount token and the API server (`--kubernetes`), or a token file and a
//! manifest directory (the testbed).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{
    ca_auth::{AuthError, Authenticator, PodDirectory, TokenFile, TokenFileError},
    issuer::{IssuerError, WorkloadIssuer},
    spiffe::SpiffeId,
    tls,
};

/// Largest request body accepted (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;

#[derive(clap::Args, Debug)]
pub struct CaServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// PEM certificate of the intermediate issuer (from the issuer Secret).
    #[arg(long)]
    pub issuer_cert: PathBuf,
    /// PEM private key of the intermediate issuer (from the issuer Secret).
    #[arg(long)]
    pub issuer_key: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Authenticate agents with TokenReview and look pods up in the API server (in-cluster
    /// service account, or KUBECONFIG).
    #[arg(long, conflicts_with_all = ["token_file", "cluster_state"])]
    pub kubernetes: bool,
    /// Audience the agents' projected tokens carry (TokenReview mode).
    #[arg(long, default_value = "nodemesh")]
    pub token_audience: String,
    /// `<namespace>/<name>` of the agents' ServiceAccount (TokenReview mode): tokens of any
    /// other account are refused.
    #[arg(long, default_value = "nodemesh-system/nodemesh-agent")]
    pub agent_service_account: String,
    /// Token file: one `<token> <node-name>` pair per line (`#` comments allowed).
    #[arg(long, required_unless_present = "kubernetes")]
    pub token_file: Option<PathBuf>,
    /// Directory of Kubernetes manifests to authorise against (see `agent --cluster-state`).
    #[arg(long, required_unless_present = "kubernetes")]
    pub cluster_state: Option<PathBuf>,
    /// DNS name or IP the CA's own serving certificate is issued for (repeatable).
    #[arg(long = "serve-name", default_value = "nodemesh-ca")]
    pub serve_names: Vec<String>,
    /// Lifetime of issued workload certificates, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub cert_ttl_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub namespace: String,
    pub pod: String,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    pub spiffe_id: String,
    /// Leaf then intermediate, PEM.
    pub certificate_chain: String,
    pub not_after_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("not authenticated: {0}")]
    Unauthenticated(AuthError),
    #[error("looking up pod {namespace}/{pod}: {source}")]
    PodLookup {
        namespace: String,
        pod: String,
        source: kube::Error,
    },
    #[error("request body: {0}")]
    BadRequest(String),
    #[error("pod {namespace}/{pod} is not known to the CA")]
    UnknownPod { namespace: String, pod: String },
    #[error(
        "pod {namespace}/{pod} runs on node \"{pod_node}\", not on the caller's node {caller_node}"
    )]
    WrongNode {
        namespace: String,
        pod: String,
        pod_node: String,
        caller_node: String,
    },
    #[error("pod {namespace}/{pod} has no valid identity: {reason}")]
    NoIdentity {
        namespace: String,
        pod: String,
        reason: String,
    },
    #[error(transparent)]
    Issuer(#[from] IssuerError),
}

impl CaError {
    fn status(&self) -> StatusCode {
        match self {
            CaError::Unauthenticated(AuthError::Api(_)) | CaError::PodLookup { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            CaError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            CaError::BadRequest(_) | CaError::NoIdentity { .. } => StatusCode::BAD_REQUEST,
            CaError::Issuer(IssuerError::Csr(_) | IssuerError::CsrPem(_)) => {
                StatusCode::BAD_REQUEST
            }
            CaError::UnknownPod { .. } | CaError::WrongNode { .. } => StatusCode::FORBIDDEN,
            CaError::Issuer(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaStartError {
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::api::ApiError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The CA's decision logic, independent of HTTP.
pub struct CertificateAuthority {
    issuer: WorkloadIssuer,
    trust_domain: String,
    authenticator: Authenticator,
    pods: PodDirectory,
    ttl: Duration,
}

impl CertificateAuthority {
    pub fn new(
        issuer: WorkloadIssuer,
        trust_domain: &str,
        authenticator: Authenticator,
        pods: PodDirectory,
        ttl: Duration,
    ) -> Self {
        Self {
            issuer,
            trust_domain: trust_domain.to_owned(),
            authenticator,
            pods,
            ttl,
        }
    }

    /// Authenticates, authorises and signs one request.
    pub async fn sign(
        &self,
        bearer: Option<&str>,
        request: &SignRequest,
    ) -> Result<SignResponse, CaError> {
        let Some(token) = bearer else {
            return Err(CaError::Unauthenticated(AuthError::UnknownToken));
        };
        let node = self
            .authenticator
            .node_of(token)
            .await
            .map_err(CaError::Unauthenticated)?;
        let node = node.as_str();
        let key = (request.namespace.clone(), request.pod.clone());
        let pod = self
            .pods
            .pod(&key.0, &key.1)
            .await
            .map_err(|source| CaError::PodLookup {
                namespace: key.0.clone(),
                pod: key.1.clone(),
                source,
            })?
            .ok_or_else(|| CaError::UnknownPod {
                namespace: key.0.clone(),
                pod: key.1.clone(),
            })?;
        let spec = pod.spec.as_ref();
        let pod_node = spec.and_then(|s| s.node_name.clone());
        if pod_node.as_deref() != Some(node) {
            return Err(CaError::WrongNode {
                namespace: key.0,
                pod: key.1,
                pod_node: pod_node.unwrap_or_else(|| "(not scheduled)".to_owned()),
                caller_node: node.to_owned(),
            });
        }
        let service_account = spec
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        let id = SpiffeId::new(&self.trust_domain, &request.namespace, service_account).map_err(
            |e| CaError::NoIdentity {
                namespace: key.0.clone(),
                pod: key.1.clone(),
                reason: e.to_string(),
            },
        )?;
        let issued = self.issuer.sign(&request.csr, &id, self.ttl)?;
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(node, pod = %format!("{}/{}", key.0, key.1), spiffe_id = %id, serial = %issued.serial, not_after_unix, "certificate issued");
        Ok(SignResponse {
            spiffe_id: id.to_string(),
            certificate_chain: issued.chain_pem,
            not_after_unix,
        })
    }
}

/// Serves the CA until the process ends. Returns once listening (errors surface at start).
pub async fn start(args: &CaServeArgs) -> Result<SocketAddr, CaStartError> {
    let issuer = WorkloadIssuer::from_files(&args.issuer_cert, &args.issuer_key)?;
    let (chain_pem, key) =
        issuer.serving_certificate(&args.serve_names, Duration::from_secs(365 * 24 * 3600))?;
    let tls = tls::ca_server_config(&chain_pem, &key.serialize_pem())?;
    let (authenticator, pods) = match (&args.token_file, &args.cluster_state) {
        (Some(tokens), Some(dir)) if !args.kubernetes => (
            Authenticator::TokenFile(TokenFile::load(tokens)?),
            PodDirectory::manifests(dir),
        ),
        _ => {
            let client = crate::k8s::api::ApiWatch::infer_client().await?;
            (
                Authenticator::TokenReview {
                    client: client.clone(),
                    audience: args.token_audience.clone(),
                    agent_service_account: args.agent_service_account.clone(),
                },
                PodDirectory::Api(client),
            )
        }
    };
    let ca = Arc::new(CertificateAuthority::new(
        issuer,
        &args.trust_domain,
        authenticator,
        pods,
        Duration::from_secs(args.cert_ttl_seconds),
    ));
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| CaStartError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CaStartError::Listen {
            addr: args.listen,
            source,
        })?;
    tracing::info!(%addr, trust_domain = %args.trust_domain, "CA listening");
    tokio::spawn(serve(listener, TlsAcceptor::from(Arc::new(tls)), ca));
    Ok(addr)
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, ca: Arc<CertificateAuthority>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, ca) = (acceptor.clone(), Arc::clone(&ca));
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(error) => {
                    tracing::info!(%peer, %error, "CA: TLS handshake failed");
                    return;
                }
            };
            let service = service_fn(move |request| {
                let ca = Arc::clone(&ca);
                async move { Ok::<_, std::convert::Infallible>(handle(request, &ca, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    ca: &CertificateAuthority,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if request.method() != Method::POST || request.uri().path() != "/v1/certificates" {
        return json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "POST /v1/certificates"}),
        );
    }
    let bearer = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let result = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Err(error) => Err(CaError::BadRequest(format!(
            "reading the body (limit {MAX_BODY} bytes): {error}"
        ))),
        Ok(body) => match serde_json::from_slice::<SignRequest>(&body.to_bytes()) {
            Ok(sign) => ca.sign(bearer.as_deref(), &sign).await,
            Err(error) => Err(CaError::BadRequest(error.to_string())),
        },
    };
    match result {
        Ok(response) => json_response(StatusCode::OK, &response),
        Err(error) => {
            tracing::warn!(%peer, %error, "CA: request refused");
            json_response(
                error.status(),
                &serde_json::json!({"error": error.to_string()}),
            )
        }
    }
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
