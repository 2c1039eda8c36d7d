//! `MeshNode` (`nodemesh.io/v1alpha1`, cluster-scoped): one object per node, named after it,
//! whose status that node's agent writes (`agent/mesh_node.rs`), the CA's sweep marks silent
//! or removes (`ca/mesh_nodes.rs`), and `nodemesh status` reads from an operator's laptop
//! (`cli/cluster/`).
//!
//! The type is derived with kube's `CustomResource`, without a generated schema: the CRD the
//! API server enforces is the chart's (`deploy/helm/nodemesh/templates/crds.yaml`, with its
//! printer columns), written by hand like the AuthorizationPolicy CRD beside it. The testbed's
//! tests write through a real API server, which prunes any field that schema lacks, so a
//! drift between the two shows up as a missing field in `nodemesh status`.

use std::time::{Duration, SystemTime};

use kube::CustomResource;
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// The field manager of the agents' writes.
pub const AGENT_FIELD_MANAGER: &str = "nodemesh-agent";
/// The field manager of the CA's sweep.
pub const SWEEP_FIELD_MANAGER: &str = "nodemesh-ca";
/// An agent counts as silent after this many heartbeat intervals without one.
pub const SILENT_AFTER_INTERVALS: u32 = 3;
/// The `notReadyReason` the sweep writes for an agent that went silent.
pub const AGENT_SILENT: &str = "AgentSilent";
/// How many pending pods and configuration errors a status lists (the counts are whole).
pub const LISTED: usize = 20;

/// A MeshNode has no spec: the node is its name, and everything else is observed.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "MeshNode",
    plural = "meshnodes",
    status = "MeshNodeStatus",
    schema = "disabled"
)]
pub struct MeshNodeSpec {}

/// What one node's agent reports.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    /// The agent's version, e.g. `0.1.0`.
    #[serde(default)]
    pub version: String,
    /// The git revision it was built from.
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub ready: bool,
    /// Why not ready: the agent's own reason, or [`AGENT_SILENT`] from the CA's sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_reason: Option<String>,
    #[serde(default)]
    pub kernel: KernelStatus,
    /// `open` or `closed`: what meshed pods' connections do while no agent runs.
    #[serde(default)]
    pub fail_mode: String,
    #[serde(default)]
    pub pods: PodCounts,
    /// The first [`LISTED`] pending pods and why each is pending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_pods: Vec<PendingPod>,
    /// When the first of the node's workload certificates expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_certificate_expiry: Option<String>,
    /// How many HTTPRoutes, AuthorizationPolicies or manifests were rejected.
    #[serde(default)]
    pub config_error_count: usize,
    /// The first [`LISTED`] of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_errors: Vec<String>,
    /// When the agent last wrote this status (RFC 3339).
    #[serde(default)]
    pub heartbeat_time: String,
    /// How often the agent writes it when nothing changes.
    #[serde(default)]
    pub heartbeat_interval_seconds: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KernelStatus {
    /// The kernel release, e.g. `6.1.0-57-amd64`.
    #[serde(default)]
    pub release: String,
    /// The eBPF hooks the datapath attached and the optional features the kernel has.
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodCounts {
    #[serde(default)]
    pub enrolled: usize,
    #[serde(default)]
    pub pending: usize,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingPod {
    /// `namespace/name`.
    pub pod: String,
    pub reason: String,
}

impl MeshNodeStatus {
    /// When the agent last wrote, if the heartbeat parses.
    pub fn heartbeat(&self) -> Option<SystemTime> {
        parse_time(&self.heartbeat_time)
    }

    /// Whether the agent has missed [`SILENT_AFTER_INTERVALS`] heartbeats at `now` (an
    /// object without a readable heartbeat counts as silent).
    pub fn silent_at(&self, now: SystemTime) -> bool {
        let interval = Duration::from_secs(self.heartbeat_interval_seconds.max(1));
        self.heartbeat().is_none_or(|at| {
            now.duration_since(at)
                .is_ok_and(|age| age > interval * SILENT_AFTER_INTERVALS)
        })
    }

    /// Whether the agent says it is ready and is not silent at `now`.
    pub fn ready_at(&self, now: SystemTime) -> bool {
        self.ready && !self.silent_at(now)
    }
}

/// `at` in RFC 3339 (UTC, whole seconds), as Kubernetes writes times.
pub fn format_time(at: SystemTime) -> String {
    let seconds = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).unwrap_or(i64::MAX))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// An RFC 3339 time, as [`format_time`] writes it.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let seconds = u64::try_from(at.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(heartbeat: SystemTime, interval: u64) -> MeshNodeStatus {
        MeshNodeStatus {
            ready: true,
            heartbeat_time: format_time(heartbeat),
            heartbeat_interval_seconds: interval,
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_is_silent_after_three_missed_heartbeats() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let status = status(at, 30);
        assert!(status.ready_at(at + Duration::from_secs(90)));
        assert!(status.silent_at(at + Duration::from_secs(91)));
        assert!(!status.ready_at(at + Duration::from_secs(91)));
        let unreadable = MeshNodeStatus {
            heartbeat_time: "yesterday".into(),
            ..status
        };
        assert!(unreadable.silent_at(at));
    }

    #[test]
    fn times_round_trip_in_rfc3339() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(format_time(at), "2027-01-15T08:00:00Z");
        assert_eq!(parse_time(&format_time(at)), Some(at));
    }

    #[test]
    fn the_status_is_camel_case_and_omits_what_is_empty() {
        let value = serde_json::to_value(MeshNodeStatus::default()).unwrap();
        assert!(value.get("heartbeatIntervalSeconds").is_some(), "{value}");
        assert!(value.get("pendingPods").is_none(), "{value}");
        assert!(value.get("notReadyReason").is_none(), "{value}");
    }
}
