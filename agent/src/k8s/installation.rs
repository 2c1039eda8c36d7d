//! Whether the mesh is still installed: the agent's own DaemonSet, watched for as long as the
//! agent runs, so that a stop can tell an uninstall from a restart.
//!
//! Asking only at SIGTERM is not enough: `helm uninstall` deletes the DaemonSet and, a few
//! milliseconds later, the agent's RBAC and ServiceAccount, while the kubelet stops the agent
//! only after the garbage collector has deleted its pod. By then a fresh request is refused
//! (401/403). A watch established while the agent was authorised is not re-authorised, so it
//! still delivers the DaemonSet's deletion.

use std::sync::{
    Arc,
    atomic::{AtomicU8, Ordering},
};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    Api, Client,
    runtime::watcher::{self, Event},
};
use tokio::task::JoinHandle;

/// What the agent last learnt about its DaemonSet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installation {
    /// Nothing learnt yet (the first list has not completed).
    Unknown,
    /// The DaemonSet exists and is not being deleted.
    Installed,
    /// The DaemonSet is gone or being deleted: a stop now is an uninstall.
    Removed,
}

impl Installation {
    fn encode(self) -> u8 {
        match self {
            Installation::Unknown => 0,
            Installation::Installed => 1,
            Installation::Removed => 2,
        }
    }

    fn decode(value: u8) -> Self {
        match value {
            1 => Installation::Installed,
            2 => Installation::Removed,
            _ => Installation::Unknown,
        }
    }

    fn of(daemonset: Option<&DaemonSet>) -> Self {
        match daemonset {
            Some(ds) if ds.metadata.deletion_timestamp.is_none() => Installation::Installed,
            _ => Installation::Removed,
        }
    }
}

/// The DaemonSet `namespace/name`, watched in the background until dropped.
pub struct InstallationWatch {
    client: Client,
    namespace: String,
    name: String,
    state: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

impl Drop for InstallationWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl InstallationWatch {
    /// Starts watching `daemonset` (`namespace/name`; a bare name is in `default`).
    pub fn start(client: Client, daemonset: &str) -> Self {
        let (namespace, name) = daemonset.split_once('/').unwrap_or(("default", daemonset));
        let state = Arc::new(AtomicU8::new(Installation::Unknown.encode()));
        let api = Api::<DaemonSet>::namespaced(client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(follow(api, config, state.clone(), daemonset.to_owned()));
        Self {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            state,
            task,
        }
    }

    /// What the watch last saw.
    pub fn watched(&self) -> Installation {
        Installation::decode(self.state.load(Ordering::Acquire))
    }

    /// The answer for a stop: a fresh read when the API server gives one, else what the watch
    /// saw last (the read is refused once uninstall has removed the agent's RBAC).
    pub async fn at_stop(&self) -> Installation {
        let api = Api::<DaemonSet>::namespaced(self.client.clone(), &self.namespace);
        match api.get_opt(&self.name).await {
            Ok(found) => Installation::of(found.as_ref()),
            Err(error) => {
                let watched = self.watched();
                tracing::info!(
                    daemonset = %format!("{}/{}", self.namespace, self.name),
                    %error,
                    ?watched,
                    "reading the agent's DaemonSet failed; deciding on what its watch saw last"
                );
                watched
            }
        }
    }
}

/// Keeps `state` equal to what the watch says, retrying with backoff when it fails.
async fn follow(
    api: Api<DaemonSet>,
    config: watcher::Config,
    state: Arc<AtomicU8>,
    daemonset: String,
) {
    use kube::runtime::WatchStreamExt;
    let mut seen_in_list = false;
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(Event::Init) => {
                seen_in_list = false;
                None
            }
            Ok(Event::InitApply(ds)) => {
                seen_in_list = true;
                Some(Installation::of(Some(&ds)))
            }
            Ok(Event::InitDone) if !seen_in_list => Some(Installation::Removed),
            Ok(Event::InitDone) => None,
            Ok(Event::Apply(ds)) => Some(Installation::of(Some(&ds))),
            Ok(Event::Delete(_)) => Some(Installation::Removed),
            Err(error) => {
                tracing::warn!(
                    %daemonset,
                    %error,
                    "watching the agent's DaemonSet (to tell an uninstall from a restart) failed; retrying with backoff"
                );
                None
            }
        };
        if let Some(now) = update {
            let before = Installation::decode(state.swap(now.encode(), Ordering::AcqRel));
            if before != now {
                tracing::info!(%daemonset, installation = ?now, "the agent's DaemonSet");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn a_daemonset_gone_or_being_deleted_means_removed() {
        assert_eq!(Installation::of(None), Installation::Removed);
        let mut daemonset = DaemonSet::default();
        assert_eq!(Installation::of(Some(&daemonset)), Installation::Installed);
        daemonset.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(Installation::of(Some(&daemonset)), Installation::Removed);
        for state in [
            Installation::Unknown,
            Installation::Installed,
            Installation::Removed,
        ] {
            assert_eq!(Installation::decode(state.encode()), state);
        }
    }
}
