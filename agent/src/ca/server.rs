//! `nodemesh ca serve`: signs workload certificates over HTTPS for node agents.
//!
//! `POST /v1/certificates` with `Authorization: Bearer <agent token>` and a JSON body
//! `{"namespace", "pod", "uid", "csr"}`. The CA authenticates the token to a node, looks the
//! pod and its namespace up in the cluster state, and signs only for a pod of that node that
//! is in the mesh (`eligibility`); the identity comes from the pod's namespace and service
//! account, never from the request or the CSR. Every decision is logged.
//!
//! Authentication and the lookups are `auth`'s: a Kubernetes TokenReview of the agent's
//! projected ServiceAccount token and the API server (`--kubernetes`), or a token file and a
//! manifest directory (the testbed). Anyone who reaches the port can connect before proving
//! anything, so it is served within `serving`'s bounds (flags below).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{
    auth::{AuthError, Authenticator, PodDirectory, TokenFile, TokenFileError},
    eligibility::{self, Ineligible, InvalidRequest},
    issuer::{IssuerError, MAX_WORKLOAD_TTL_SECONDS, WorkloadIssuer},
    token_review::{ReviewError, TokenReviewer},
};
use crate::{
    identity::{
        ca_client::{SignRequest, SignResponse},
        tls,
    },
    serving::{BoundedServer, Limits},
};

/// Largest request body accepted (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;
/// How long a client has to send the request body once its head has arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to complete the TLS handshake, and then to send a request head.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept (an agent makes one request per connection).
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

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
    /// Lifetime of issued workload certificates, in seconds: at most 7 days (604800).
    /// Certificates never outlive the issuer certificate; agents renew at 70%.
    #[arg(long, default_value_t = 24 * 3600,
          value_parser = clap::value_parser!(u64).range(1..=MAX_WORKLOAD_TTL_SECONDS))]
    pub cert_ttl_seconds: u64,
    /// With --kubernetes: how often the CA sweeps MeshNode objects, marking silent agents not
    /// ready and removing the objects of deleted nodes (seconds; 0 turns the sweep off).
    #[arg(long, default_value_t = 30)]
    pub mesh_node_sweep_seconds: u64,
    /// Connections served at once; more are reset (agents retry with backoff).
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Connections served at once from one source address (IPv6: one /64); an agent makes
    /// one at a time.
    #[arg(long, default_value_t = 32)]
    pub max_connections_per_source: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("not authenticated: {0}")]
    Unauthenticated(AuthError),
    #[error("looking up {what}: {source}")]
    Lookup { what: String, source: kube::Error },
    #[error("request body: {0}")]
    BadRequest(String),
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("pod {namespace}/{pod} is not known to the CA")]
    UnknownPod { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} {reason}")]
    Ineligible {
        namespace: String,
        pod: String,
        reason: Ineligible,
    },
    #[error(transparent)]
    Issuer(#[from] IssuerError),
}

impl CaError {
    pub fn status(&self) -> StatusCode {
        match self {
            CaError::Unauthenticated(AuthError::Review(ReviewError::Api(_)))
            | CaError::Lookup { .. } => StatusCode::SERVICE_UNAVAILABLE,
            CaError::Unauthenticated(AuthError::Review(ReviewError::RateLimited(_))) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            CaError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            CaError::BadRequest(_) | CaError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            CaError::Issuer(IssuerError::Csr(_) | IssuerError::CsrPem(_)) => {
                StatusCode::BAD_REQUEST
            }
            CaError::UnknownPod { .. } | CaError::Ineligible { .. } => StatusCode::FORBIDDEN,
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

    /// Authenticates, authorises and signs one request that came from `peer`.
    pub async fn sign(
        &self,
        bearer: Option<&str>,
        request: &SignRequest,
        peer: SocketAddr,
    ) -> Result<SignResponse, CaError> {
        let (namespace, name) = (request.namespace.as_str(), request.pod.as_str());
        let uid = eligibility::check_request(namespace, name, request.uid.as_deref())?;
        let Some(token) = bearer else {
            return Err(CaError::Unauthenticated(AuthError::UnknownToken));
        };
        let node = self
            .authenticator
            .node_of(token, peer.ip())
            .await
            .map_err(CaError::Unauthenticated)?;
        let lookup = |what: String| move |source| CaError::Lookup { what, source };
        let pod = self
            .pods
            .pod(namespace, name)
            .await
            .map_err(lookup(format!("pod {namespace}/{name}")))?
            .ok_or_else(|| CaError::UnknownPod {
                namespace: namespace.to_owned(),
                pod: name.to_owned(),
            })?;
        let namespace_meshed = self
            .pods
            .namespace_meshed(namespace)
            .await
            .map_err(lookup(format!("namespace {namespace}")))?;
        let id = eligibility::identity_for(&pod, namespace_meshed, &node, uid, &self.trust_domain)
            .map_err(|reason| CaError::Ineligible {
                namespace: namespace.to_owned(),
                pod: name.to_owned(),
                reason,
            })?;
        let issued = self.issuer.sign(&request.csr, &id, self.ttl)?;
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(node, pod = %format!("{namespace}/{name}"), uid, spiffe_id = %id, serial = %issued.serial, not_after_unix, "certificate issued");
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
            if args.mesh_node_sweep_seconds > 0 {
                tokio::spawn(super::mesh_nodes::sweep_forever(
                    client.clone(),
                    Duration::from_secs(args.mesh_node_sweep_seconds),
                ));
            }
            (
                Authenticator::TokenReview(Box::new(TokenReviewer::new(
                    client.clone(),
                    &args.token_audience,
                    &args.agent_service_account,
                ))),
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
    let limits = Limits {
        max_connections: args.max_connections,
        max_connections_per_source: args.max_connections_per_source,
        handshake_timeout: CLIENT_TIMEOUT,
        header_read_timeout: CLIENT_TIMEOUT,
        max_lifetime: MAX_CONNECTION_LIFETIME,
    };
    let server = BoundedServer::new("ca", limits, Some(TlsAcceptor::from(Arc::new(tls))));
    tokio::spawn(server.serve(listener, move |peer| {
        let ca = Arc::clone(&ca);
        service_fn(move |request| {
            let ca = Arc::clone(&ca);
            async move { Ok::<_, std::convert::Infallible>(handle(request, &ca, peer).await) }
        })
    }));
    Ok(addr)
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
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), MAX_BODY).collect(),
    );
    let result = match body.await {
        Err(_) => Err(CaError::BadRequest(format!(
            "the body did not arrive within {BODY_TIMEOUT:?}"
        ))),
        Ok(Err(error)) => Err(CaError::BadRequest(format!(
            "reading the body (limit {MAX_BODY} bytes): {error}"
        ))),
        Ok(Ok(body)) => match serde_json::from_slice::<SignRequest>(&body.to_bytes()) {
            Ok(sign) => ca.sign(bearer.as_deref(), &sign, peer).await,
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
