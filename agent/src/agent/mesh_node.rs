//! The node's MeshNode status (`k8s/meshnode.rs`), written by its agent so that operators see
//! every node from the API server: what the admin API shows, in brief.
//!
//! Written when it changes, but never sooner than a sixth of the heartbeat interval after the
//! previous write, and every interval when nothing changes (the heartbeat). At the default
//! 30 s, 5,000 nodes make ~170 writes/s when quiet, the order of the kubelet's node leases.
//! The object is named after the node; the chart's ValidatingAdmissionPolicy lets an agent's
//! token, which names its node, write that object and no other.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::{
    admin::AdminState,
    datapath,
    k8s::meshnode::{
        AGENT_FIELD_MANAGER, KernelStatus, LISTED, MeshNode, MeshNodeStatus, PendingPod, PodCounts,
        format_time,
    },
};

/// How often the agent looks for a change (writes are rarer).
const LOOK: Duration = Duration::from_secs(1);

/// Writes the node's MeshNode status until dropped.
pub(super) fn start(
    client: Client,
    admin: Arc<AdminState>,
    interval: Duration,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(publish(client, admin, interval)))
}

async fn publish(client: Client, admin: Arc<AdminState>, interval: Duration) {
    let api: Api<MeshNode> = Api::all(client);
    let node = admin.node_name.clone();
    let kernel = datapath::kernel_features();
    let kernel = KernelStatus {
        release: kernel.0,
        features: kernel.1,
    };
    let gap = interval / 6;
    let mut written: Option<(MeshNodeStatus, Instant)> = None;
    let mut last_error: Option<String> = None;
    let mut look = tokio::time::interval(LOOK.min(gap.max(Duration::from_millis(100))));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        look.tick().await;
        let status = observe(&admin, &kernel, interval);
        let due = written.as_ref().is_none_or(|(before, at)| {
            let changed = *before != status;
            at.elapsed() >= interval || (changed && at.elapsed() >= gap)
        });
        if !due {
            continue;
        }
        let mut stamped = status.clone();
        stamped.heartbeat_time = format_time(SystemTime::now());
        match write(&api, &node, &stamped).await {
            Ok(()) => {
                if last_error.take().is_some() {
                    tracing::info!(node, "MeshNode status written again");
                }
                written = Some((status, Instant::now()));
            }
            Err(error) => {
                let error = error.to_string();
                if last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(node, %error, "writing the MeshNode status failed; retrying");
                }
                last_error = Some(error);
            }
        }
    }
}

/// The status as of now, without its heartbeat time (so that two can be compared).
fn observe(admin: &AdminState, kernel: &KernelStatus, interval: Duration) -> MeshNodeStatus {
    let state = Arc::clone(&admin.state.borrow());
    let ready = admin.ready.load(Ordering::Acquire);
    MeshNodeStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        revision: env!("NODEMESH_REVISION").to_owned(),
        ready,
        not_ready_reason: (!ready).then(|| "Starting".to_owned()),
        kernel: kernel.clone(),
        fail_mode: admin.fail_mode.to_owned(),
        pods: PodCounts {
            enrolled: state.enrolled.len(),
            pending: state.pending.len(),
        },
        pending_pods: state
            .pending
            .iter()
            .take(LISTED)
            .map(|p| PendingPod {
                pod: format!("{}/{}", p.namespace, p.name),
                reason: p.reason.clone(),
            })
            .collect(),
        earliest_certificate_expiry: admin
            .identities
            .as_ref()
            .and_then(|m| m.earliest_expiry())
            .map(format_time),
        config_error_count: state.config_errors.len(),
        config_errors: state.config_errors.iter().take(LISTED).cloned().collect(),
        heartbeat_time: String::new(),
        heartbeat_interval_seconds: interval.as_secs(),
    }
}

/// Applies `status` to the node's object, creating the object first if it does not exist.
async fn write(api: &Api<MeshNode>, node: &str, status: &MeshNodeStatus) -> kube::Result<()> {
    let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
    let body = json!({
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "MeshNode",
        "metadata": {"name": node},
        "status": status,
    });
    match api.patch_status(node, &params, &Patch::Apply(&body)).await {
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let object = json!({
                "apiVersion": "nodemesh.io/v1alpha1",
                "kind": "MeshNode",
                "metadata": {"name": node},
                "spec": {},
            });
            api.patch(node, &params, &Patch::Apply(&object)).await?;
            api.patch_status(node, &params, &Patch::Apply(&body))
                .await
                .map(drop)
        }
        other => other.map(drop),
    }
}
