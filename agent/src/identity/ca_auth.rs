//! Who may ask the CA for what: authenticating the calling agent to a node, and looking up
//! the pod whose identity it asks for.
//!
//! In a cluster (`nodemesh ca serve --kubernetes`) the agent presents its projected
//! ServiceAccount token with the nodemesh audience; the CA sends it to the API server in a
//! TokenReview, requires the agent's own ServiceAccount (a workload could mint a token with
//! the same audience), and takes the node from the token's pod binding (the
//! `authentication.kubernetes.io/node-name` extra, or, on API servers that do not add it,
//! the bound pod's `spec.nodeName`). Pods are read from the API server at request time, so a
//! pod scheduled a moment ago is found. On the testbed a token file and a manifest directory
//! stand in for both, behind the same interface.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, api::PostParams};

use crate::k8s::cluster_state;

/// TokenReview `user.extra` keys of a token bound to a pod.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or unknown bearer token")]
    UnknownToken,
    #[error("token rejected by the API server: {0}")]
    Rejected(String),
    #[error("token belongs to {0}, not to the agent's ServiceAccount {1}")]
    NotTheAgent(String, String),
    #[error("token of {0} is not bound to a pod, so it names no node")]
    Unbound(String),
    #[error("asking the API server: {0}")]
    Api(#[from] kube::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `<token> <node-name>`")]
    Line { path: PathBuf, line: usize },
}

/// Token file authentication (the testbed's stand-in): token -> node name.
pub struct TokenFile(BTreeMap<String, String>);

impl TokenFile {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut tokens = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                [token, node] => tokens.insert((*token).to_owned(), (*node).to_owned()),
                _ => {
                    return Err(TokenFileError::Line {
                        path: path.to_owned(),
                        line: index + 1,
                    });
                }
            };
        }
        Ok(Self(tokens))
    }
}

/// How the CA learns the caller's node from its token.
pub enum Authenticator {
    TokenFile(TokenFile),
    TokenReview {
        client: kube::Client,
        audience: String,
        /// `<namespace>/<name>` of the agents' ServiceAccount.
        agent_service_account: String,
    },
}

impl Authenticator {
    /// The node the caller speaks for.
    pub async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        match self {
            Self::TokenFile(file) => file.0.get(token).cloned().ok_or(AuthError::UnknownToken),
            Self::TokenReview {
                client,
                audience,
                agent_service_account,
            } => review(client, token, audience, agent_service_account).await,
        }
    }
}

async fn review(
    client: &kube::Client,
    token: &str,
    audience: &str,
    agent_service_account: &str,
) -> Result<String, AuthError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status
                .error
                .unwrap_or_else(|| "not authenticated".to_owned()),
        ));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(AuthError::Rejected(format!(
            "token is not for the {audience:?} audience"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, name) = agent_service_account
        .split_once('/')
        .unwrap_or(("", agent_service_account));
    if username != format!("system:serviceaccount:{namespace}:{name}") {
        return Err(AuthError::NotTheAgent(
            username,
            agent_service_account.to_owned(),
        ));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
    if let Some(node) = first(EXTRA_NODE_NAME) {
        return Ok(node);
    }
    let Some(pod_name) = first(EXTRA_POD_NAME) else {
        return Err(AuthError::Unbound(username));
    };
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(&pod_name)
        .await?;
    pod.spec
        .and_then(|spec| spec.node_name)
        .ok_or(AuthError::Unbound(username))
}

/// Where the CA looks pods up.
pub enum PodDirectory {
    Manifests(PathBuf),
    Api(kube::Client),
}

impl PodDirectory {
    pub fn manifests(dir: &Path) -> Self {
        Self::Manifests(dir.to_owned())
    }

    /// The pod, or None when it does not exist.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, kube::Error> {
        match self {
            Self::Manifests(dir) => Ok(cluster_state::find_pod(dir, namespace, name)),
            Self::Api(client) => {
                Api::<Pod>::namespaced(client.clone(), namespace)
                    .get_opt(name)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! TokenReview and the pod lookup against an API-server test double on loopback that
    //! answers with real Kubernetes JSON (no API server can run here).

    use std::{convert::Infallible, sync::Arc};

    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Bytes, service::service_fn};
    use hyper_util::rt::TokioIo;
    use serde_json::{Value, json};
    use tokio::net::TcpListener;

    use super::*;

    const AGENT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";

    /// What the double answers for a token: (authenticated, username, extra).
    fn review_for(token: &str) -> (bool, &'static str, Value) {
        match token {
            "agent-node1" => (
                true,
                AGENT,
                json!({EXTRA_NODE_NAME: ["node1"], EXTRA_POD_NAME: ["agent-a"]}),
            ),
            // An API server that does not add the node name: found through the bound pod.
            "agent-no-node-extra" => (true, AGENT, json!({EXTRA_POD_NAME: ["agent-b"]})),
            "agent-unbound" => (true, AGENT, json!({})),
            // A workload that minted a token with the nodemesh audience.
            "workload" => (
                true,
                "system:serviceaccount:shop:web",
                json!({EXTRA_NODE_NAME: ["node1"]}),
            ),
            _ => (false, "", json!({})),
        }
    }

    async fn answer(request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let (status, value) = match path.as_str() {
            "/apis/authentication.k8s.io/v1/tokenreviews" => {
                let review: TokenReview = serde_json::from_slice(&body).unwrap();
                let (authenticated, username, extra) = review_for(&review.spec.token);
                let audiences = review.spec.audiences.clone().unwrap_or_default();
                (
                    201,
                    json!({
                        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "metadata": {},
                        "spec": review.spec,
                        "status": {
                            "authenticated": authenticated,
                            "audiences": audiences,
                            "user": {"username": username, "extra": extra},
                        },
                    }),
                )
            }
            "/api/v1/namespaces/nodemesh-system/pods/agent-b" => {
                (200, pod_json("agent-b", "node2"))
            }
            "/api/v1/namespaces/shop/pods/web-1" => (200, pod_json("web-1", "node1")),
            _ => (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        response
    }

    fn pod_json(name: &str, node: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": "web",
                     "containers": [{"name": "app", "image": "x"}]},
        })
    }

    async fn fake_api_server() -> kube::Client {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(stream),
                    service_fn(|r| async { Ok::<_, Infallible>(answer(r).await) }),
                ));
            }
        });
        kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
    }

    fn authenticator(client: kube::Client) -> Arc<Authenticator> {
        Arc::new(Authenticator::TokenReview {
            client,
            audience: "nodemesh".into(),
            agent_service_account: "nodemesh-system/nodemesh-agent".into(),
        })
    }

    #[tokio::test]
    async fn token_review_names_the_agents_node_and_refuses_everyone_else() {
        let client = fake_api_server().await;
        let auth = authenticator(client.clone());
        assert_eq!(auth.node_of("agent-node1").await.unwrap(), "node1");
        assert_eq!(
            auth.node_of("agent-no-node-extra").await.unwrap(),
            "node2",
            "without the node-name extra the bound pod's node is used"
        );
        let workload = auth.node_of("workload").await.unwrap_err().to_string();
        assert!(
            workload.contains("system:serviceaccount:shop:web")
                && workload.contains("nodemesh-system/nodemesh-agent"),
            "{workload}"
        );
        assert!(matches!(
            auth.node_of("agent-unbound").await,
            Err(AuthError::Unbound(_))
        ));
        assert!(matches!(
            auth.node_of("stolen-or-expired").await,
            Err(AuthError::Rejected(_))
        ));

        let pods = PodDirectory::Api(client);
        let web = pods.pod("shop", "web-1").await.unwrap().unwrap();
        assert_eq!(web.spec.unwrap().node_name.as_deref(), Some("node1"));
        assert!(pods.pod("shop", "gone").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_an_error_not_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        assert!(matches!(
            authenticator(client).node_of("agent-node1").await,
            Err(AuthError::Api(_))
        ));
    }
}
