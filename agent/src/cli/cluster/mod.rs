//! The operator commands that work from a laptop, through the API server, with the caller's
//! kubeconfig: `nodemesh status` across the cluster (the agents' MeshNode objects),
//! `nodemesh top` across the cluster (every agent's metrics), and `nodemesh check` (the
//! pre-flight before an install). The same binary installed as `kubectl-nodemesh` is a
//! kubectl plugin and runs these by default.

pub mod check;
pub mod status;
pub mod top;

use std::{future::Future, path::Path};

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

/// The namespace the chart installs into (docs/install.md).
pub const DEFAULT_NAMESPACE: &str = "nodemesh-system";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading the kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "no Kubernetes configuration: {0} (pass --kubeconfig, set KUBECONFIG, or run in a pod)"
    )]
    Infer(String),
    #[error("the Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("starting the client's runtime: {0}")]
    Runtime(std::io::Error),
}

impl ClusterError {
    /// A failed API call, said with what it was for.
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Api { what, source }
    }
}

/// A Kubernetes client with a small runtime of its own: the CLI commands are synchronous.
pub struct ClusterClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl ClusterClient {
    /// A client from `kubeconfig`, else from KUBECONFIG, `~/.kube/config` or the pod's
    /// service account, as kubectl finds its configuration.
    pub fn connect(kubeconfig: Option<&Path>) -> Result<Self, ClusterError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let config = runtime.block_on(async {
            match kubeconfig {
                Some(path) => {
                    let error = |message: String| ClusterError::Kubeconfig {
                        path: path.display().to_string(),
                        message,
                    };
                    let file = Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
                    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| error(e.to_string()))
                }
                None => kube::Config::infer()
                    .await
                    .map_err(|e| ClusterError::Infer(e.to_string())),
            }
        })?;
        let client = {
            let _entered = runtime.enter();
            Client::try_from(config).map_err(ClusterError::Client)?
        };
        Ok(Self { runtime, client })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `future` to completion on the client's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

/// Whether a Kubernetes configuration is at hand without flags: KUBECONFIG, the default
/// kubeconfig, or a pod's service account.
pub fn configuration_at_hand() -> bool {
    std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("HOME")
            .is_some_and(|home| Path::new(&home).join(".kube/config").is_file())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}
