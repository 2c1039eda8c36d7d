//! The CA's sweep of MeshNode objects (`k8s/meshnode.rs`): an agent that stops writing cannot
//! say so itself, and the object of a node that is gone has nobody left to remove it.
//!
//! Every sweep interval the CA lists the MeshNodes, then the Nodes. An object whose agent
//! missed three heartbeats is marked not ready (`notReadyReason: AgentSilent`), so that
//! `kubectl get meshnodes` shows it; the agent's next write, if it comes back, marks it
//! ready again. An object whose Node is absent from a list taken after the MeshNodes' is
//! deleted. The CA does this rather than an owner reference to the Node because it already
//! runs with a client, once per cluster, and the same loop has to mark silence anyway.

use std::{collections::BTreeSet, time::Duration, time::SystemTime};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::k8s::meshnode::{AGENT_SILENT, MeshNode, SILENT_AFTER_INTERVALS, SWEEP_FIELD_MANAGER};

/// What one sweep changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub marked_silent: Vec<String>,
    pub removed: Vec<String>,
}

/// Sweeps every `every` until the task is dropped.
pub async fn sweep_forever(client: Client, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match sweep(&client, SystemTime::now()).await {
            Ok(swept) => {
                failing = false;
                for node in &swept.marked_silent {
                    tracing::warn!(
                        node,
                        intervals = SILENT_AFTER_INTERVALS,
                        "agent silent: MeshNode marked not ready"
                    );
                }
                for node in &swept.removed {
                    tracing::info!(node, "node gone: its MeshNode removed");
                }
            }
            // A missing CRD (the chart not installed yet) or RBAC: say it once, keep trying.
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "sweeping MeshNodes failed; retrying every interval");
            }
            Err(_) => {}
        }
    }
}

/// One sweep at `now`.
pub async fn sweep(client: &Client, now: SystemTime) -> kube::Result<Swept> {
    let mesh_nodes: Api<MeshNode> = Api::all(client.clone());
    let objects = mesh_nodes.list(&ListParams::default()).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let present: BTreeSet<String> = nodes
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let mut swept = Swept::default();
    for object in objects.items {
        let Some(name) = object.metadata.name.clone() else {
            continue;
        };
        if !present.contains(&name) {
            mesh_nodes.delete(&name, &DeleteParams::default()).await?;
            swept.removed.push(name);
            continue;
        }
        let Some(status) = &object.status else {
            continue;
        };
        if status.ready && status.silent_at(now) {
            // A merge patch: it takes these two fields from the agent's apply without a
            // conflict, and the agent's next apply (forced) takes them back.
            let patch = json!({"status": {"ready": false, "notReadyReason": AGENT_SILENT}});
            mesh_nodes
                .patch_status(
                    &name,
                    &PatchParams {
                        field_manager: Some(SWEEP_FIELD_MANAGER.to_owned()),
                        ..Default::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await?;
            swept.marked_silent.push(name);
        }
    }
    Ok(swept)
}
