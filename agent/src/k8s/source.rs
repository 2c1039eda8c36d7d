//! Where the agent's cluster state comes from, behind one interface: a change signal and a
//! snapshot with the errors of rejected objects (whose last good version is in the snapshot).

use std::{path::Path, time::Duration};

use tokio::sync::mpsc;

use crate::state::routes::RouteStatusUpdate;

use super::{
    api::{ApiError, ApiWatch},
    cluster_state::{ClusterStateDir, ManifestError},
    snapshot::ClusterSnapshot,
};

pub enum ClusterSource {
    /// A directory of manifests (`--cluster-state`), watched with inotify.
    Manifests {
        dir: ClusterStateDir,
        _watcher: notify::RecommendedWatcher,
    },
    /// The API server (`--kubernetes`).
    Api(Box<ApiWatch>),
}

impl ClusterSource {
    pub fn manifests(dir: &Path) -> Result<(Self, mpsc::Receiver<()>), ManifestError> {
        let dir = ClusterStateDir::new(dir);
        let (watcher, changes) = dir.watch()?;
        Ok((
            Self::Manifests {
                dir,
                _watcher: watcher,
            },
            changes,
        ))
    }

    /// Starts the watches and returns once every kind has been listed (the agent must not
    /// report ready, nor remove enrolments, before it knows the whole state).
    pub async fn api(
        node: &str,
        sync_timeout: Duration,
    ) -> Result<(Self, mpsc::Receiver<()>), ApiError> {
        let client = ApiWatch::infer_client().await?;
        let (tx, changes) = mpsc::channel(1);
        let watch = ApiWatch::start(client, node, tx);
        watch.wait_synced(sync_timeout).await?;
        tracing::info!("initial list from the Kubernetes API server complete");
        Ok((Self::Api(Box::new(watch)), changes))
    }

    /// Reports route status to the API server; a manifest directory has nowhere to write it
    /// (the agent's log and /config_dump carry the same errors).
    pub fn write_route_statuses(&self, updates: Vec<RouteStatusUpdate>) {
        if let Self::Api(watch) = self {
            watch.write_route_statuses(updates);
        }
    }

    /// Whether statuses are written anywhere (computing them is wasted work otherwise).
    pub fn writes_status(&self) -> bool {
        matches!(self, Self::Api(_))
    }

    pub fn refresh(&mut self) -> (ClusterSnapshot, Vec<String>) {
        match self {
            Self::Manifests { dir, .. } => {
                let (snapshot, errors) = dir.refresh();
                (snapshot, errors.iter().map(ToString::to_string).collect())
            }
            Self::Api(watch) => watch.snapshot(),
        }
    }
}
