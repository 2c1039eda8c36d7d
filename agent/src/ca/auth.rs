//! Who may ask the CA for what: authenticating the calling agent to a node, and looking up
//! the pod whose identity it asks for and that pod's namespace.
//!
//! In a cluster (`nodemesh ca serve --kubernetes`) the agent presents its projected
//! ServiceAccount token with the nodemesh audience, which the CA has the API server review
//! (`token_review`: cached, rate-limited per source). Pods and namespaces are read from the
//! API server at request time, so a pod scheduled a moment ago is found. On the testbed a
//! token file and a manifest directory stand in for both, behind the same interface.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;

use super::token_review::{ReviewError, TokenReviewer};
use crate::k8s::{cluster_state, labels};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or unknown bearer token")]
    UnknownToken,
    #[error(transparent)]
    Review(#[from] ReviewError),
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
    TokenReview(Box<TokenReviewer>),
}

impl Authenticator {
    /// The node the caller, connected from `source`, speaks for.
    pub async fn node_of(&self, token: &str, source: IpAddr) -> Result<String, AuthError> {
        match self {
            Self::TokenFile(file) => file.0.get(token).cloned().ok_or(AuthError::UnknownToken),
            Self::TokenReview(reviewer) => Ok(reviewer.node_of(token, source).await?),
        }
    }
}

/// Where the CA looks pods and namespaces up.
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

    /// Whether the namespace exists and is in the mesh (labelled `nodemesh.io/mesh=enabled`).
    pub async fn namespace_meshed(&self, name: &str) -> Result<bool, kube::Error> {
        match self {
            Self::Manifests(dir) => Ok(cluster_state::namespace_meshed(dir, name)),
            Self::Api(client) => Ok(Api::<Namespace>::all(client.clone())
                .get_opt(name)
                .await?
                .is_some_and(|namespace| labels::opted_in(&namespace))),
        }
    }
}
