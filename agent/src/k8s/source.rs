//! Where the agent's cluster state comes from, behind one interface: a change signal, the
//! indices the source keeps current, and a snapshot of the small kinds with the errors of
//! rejected objects (whose last good version is in the snapshot).

use std::{path::Path, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::{
    api::{ApiError, ApiWatch},
    cluster_state::{ClusterStateDir, ManifestError},
    discovery,
    objects::RouteStatusUpdate,
    snapshot::{ClusterIndices, ClusterSnapshot},
    status::{SourceStatus, WatchState},
};

pub enum ClusterSource {
    /// A directory of manifests (`--cluster-state`), watched with inotify.
    Manifests {
        dir: ClusterStateDir,
        indices: ClusterIndices,
        _watcher: notify::RecommendedWatcher,
    },
    /// The API server (`--kubernetes`).
    Api(Box<ApiWatch>),
}

impl ClusterSource {
    pub fn manifests(
        dir: &Path,
        node: &str,
        indices: ClusterIndices,
        status: &SourceStatus,
    ) -> Result<(Self, mpsc::Receiver<()>), ManifestError> {
        let state = ClusterStateDir::new(dir, node);
        let (watcher, changes) = state.watch()?;
        let resource = dir.display().to_string();
        status.set(
            "manifest directory",
            &resource,
            WatchState::Watching,
            None,
            None,
        );
        Ok((
            Self::Manifests {
                dir: state,
                indices,
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
        indices: ClusterIndices,
        status: Arc<SourceStatus>,
    ) -> Result<(Self, mpsc::Receiver<()>), ApiError> {
        let client = ApiWatch::infer_client().await?;
        let (tx, changes) = mpsc::channel(1);
        let started = std::time::Instant::now();
        let watch = ApiWatch::start(client, node, &indices, status, tx, discovery::RECHECK);
        watch.wait_synced(sync_timeout).await?;
        let (pods, services) = {
            let workloads = indices.workloads.read().unwrap_or_else(|p| p.into_inner());
            let services = indices.services.read().unwrap_or_else(|p| p.into_inner());
            (workloads.len(), services.counts().0)
        };
        tracing::info!(
            pods,
            services,
            seconds = started.elapsed().as_secs_f64(),
            "initial list from the Kubernetes API server complete"
        );
        Ok((Self::Api(Box::new(watch)), changes))
    }

    /// Reports route status to the API server; a manifest directory has nowhere to write it
    /// (the agent's log and /config_dump carry the same errors).
    pub fn write_route_statuses(&self, updates: Vec<RouteStatusUpdate>) {
        if let Self::Api(watch) = self {
            watch.write_route_statuses(updates);
        }
    }

    /// The API server's client (none for a manifest directory).
    pub fn client(&self) -> Option<kube::Client> {
        match self {
            Self::Manifests { .. } => None,
            Self::Api(watch) => Some(watch.client()),
        }
    }

    /// Whether statuses are written anywhere (computing them is wasted work otherwise).
    pub fn writes_status(&self) -> bool {
        matches!(self, Self::Api(_))
    }

    pub fn refresh(&mut self) -> (ClusterSnapshot, Vec<String>) {
        match self {
            Self::Manifests { dir, indices, .. } => {
                let (snapshot, errors) = dir.refresh(indices);
                (snapshot, errors.iter().map(ToString::to_string).collect())
            }
            Self::Api(watch) => watch.snapshot(),
        }
    }
}
