//! `nodemesh status` across the cluster: every node's MeshNode object, problems first
//! (silent or not-ready agents, pending pods, rejected configuration, expiring
//! certificates, nodes without an agent), and one node in detail with `--node`.

use std::{
    fmt::Write,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};

use super::{ClusterClient, ClusterError};
use crate::{
    cli::status::human,
    k8s::meshnode::{MeshNode, MeshNodeStatus, parse_time},
};

/// A certificate this close to expiry is flagged: agents renew at 70% of the lifetime, so a
/// healthy node's first expiry is never this close with lifetimes from 35 minutes up (the
/// default is 24 hours).
const EXPIRY_WARNING: Duration = Duration::from_secs(600);

/// What the API server holds: the MeshNodes, and the Nodes that have none.
pub struct ClusterView {
    pub mesh_nodes: Vec<MeshNode>,
    pub nodes_without_agent: Vec<String>,
}

impl ClusterView {
    /// Reads the MeshNodes and the Nodes.
    pub fn fetch(cluster: &ClusterClient) -> Result<Self, ClusterError> {
        let mesh_nodes: Api<MeshNode> = Api::all(cluster.client());
        let nodes: Api<Node> = Api::all(cluster.client());
        cluster.block_on(async {
            let mesh_nodes = mesh_nodes
                .list(&ListParams::default())
                .await
                .map_err(ClusterError::api(
                    "listing MeshNodes (is nodemesh installed? `nodemesh check` says)",
                ))?
                .items;
            let nodes = nodes
                .list_metadata(&ListParams::default())
                .await
                .map_err(ClusterError::api("listing Nodes"))?
                .items;
            let nodes_without_agent = nodes
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .filter(|name| {
                    !mesh_nodes
                        .iter()
                        .any(|m| m.metadata.name.as_ref() == Some(name))
                })
                .collect();
            Ok(Self {
                mesh_nodes,
                nodes_without_agent,
            })
        })
    }
}

/// The problems of one node, worst first; empty when it is healthy.
pub fn problems(status: Option<&MeshNodeStatus>, now: SystemTime) -> Vec<String> {
    let Some(status) = status else {
        return vec!["the agent has not reported yet".to_owned()];
    };
    let mut problems = Vec::new();
    if status.silent_at(now) {
        let age = status
            .heartbeat()
            .and_then(|at| now.duration_since(at).ok())
            .map_or("ever".to_owned(), |age| human(age.as_secs()));
        problems.push(format!(
            "agent silent: no heartbeat for {age} (it writes every {}s)",
            status.heartbeat_interval_seconds
        ));
    } else if !status.ready {
        problems.push(format!(
            "agent not ready: {}",
            status
                .not_ready_reason
                .as_deref()
                .unwrap_or("no reason given")
        ));
    }
    for pod in &status.pending_pods {
        problems.push(format!("pod {} pending: {}", pod.pod, pod.reason));
    }
    let unlisted = status
        .pods
        .pending
        .saturating_sub(status.pending_pods.len());
    if unlisted > 0 {
        problems.push(format!("{unlisted} more pending pods"));
    }
    if let Some(expiry) = status
        .earliest_certificate_expiry
        .as_deref()
        .and_then(parse_time)
    {
        match expiry.duration_since(now) {
            Err(_) => problems.push("a workload certificate has EXPIRED".to_owned()),
            Ok(left) if left < EXPIRY_WARNING => problems.push(format!(
                "a workload certificate expires in {}",
                human(left.as_secs())
            )),
            Ok(_) => {}
        }
    }
    for error in &status.config_errors {
        problems.push(format!("config rejected: {error}"));
    }
    problems
}

/// The whole cluster at a glance, problems first.
pub fn report(view: &ClusterView, now: SystemTime) -> String {
    let mut rows: Vec<(String, Option<&MeshNodeStatus>, Vec<String>)> = view
        .mesh_nodes
        .iter()
        .map(|m| {
            let name = m.metadata.name.clone().unwrap_or_default();
            (name, m.status.as_ref(), problems(m.status.as_ref(), now))
        })
        .collect();
    rows.extend(view.nodes_without_agent.iter().map(|name| {
        (
            name.clone(),
            None,
            vec!["no MeshNode: no nodemesh agent runs on this node".to_owned()],
        )
    }));
    rows.sort_by(|a, b| a.2.is_empty().cmp(&b.2.is_empty()).then(a.0.cmp(&b.0)));
    let statuses = || rows.iter().filter_map(|(_, s, _)| *s);
    let ready = statuses().filter(|s| s.ready_at(now)).count();
    let enrolled: usize = statuses().map(|s| s.pods.enrolled).sum();
    let pending: usize = statuses().map(|s| s.pods.pending).sum();
    let troubled = rows.iter().filter(|r| !r.2.is_empty()).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster: {} nodes, {ready} ready, {troubled} with problems; {enrolled} pods enrolled, {pending} pending",
        rows.len()
    );
    let _ = writeln!(
        out,
        "\n  {:<20} {:<9} {:>5} {:>8} {:<12} {:<10} VERSION",
        "NODE", "READY", "PODS", "PENDING", "CERT-EXPIRY", "HEARTBEAT"
    );
    for (name, status, _) in &rows {
        let _ = writeln!(out, "  {}", node_line(name, *status, now));
    }
    if troubled > 0 {
        let _ = writeln!(out, "\nPROBLEMS");
        for (name, _, problems) in rows.iter().filter(|r| !r.2.is_empty()) {
            for problem in problems {
                let _ = writeln!(out, "  {name}: {problem}");
            }
        }
    }
    out
}

fn node_line(name: &str, status: Option<&MeshNodeStatus>, now: SystemTime) -> String {
    let Some(status) = status else {
        return format!(
            "{name:<20} {:<9} {:>5} {:>8} {:<12} {:<10} -",
            "NO AGENT", "-", "-", "-", "-"
        );
    };
    let ready = if status.silent_at(now) {
        "SILENT"
    } else if status.ready {
        "yes"
    } else {
        "NO"
    };
    let version = &status.version;
    format!(
        "{name:<20} {ready:<9} {:>5} {:>8} {:<12} {:<10} {version}",
        status.pods.enrolled,
        status.pods.pending,
        expiry(status, now),
        heartbeat_age(status, now),
    )
}

fn expiry(status: &MeshNodeStatus, now: SystemTime) -> String {
    match status
        .earliest_certificate_expiry
        .as_deref()
        .and_then(parse_time)
    {
        None => "-".to_owned(),
        Some(at) => at
            .duration_since(now)
            .map_or("EXPIRED".to_owned(), |left| human(left.as_secs())),
    }
}

fn heartbeat_age(status: &MeshNodeStatus, now: SystemTime) -> String {
    status.heartbeat().map_or("never".to_owned(), |at| {
        format!(
            "{} ago",
            human(now.duration_since(at).map_or(0, |d| d.as_secs()))
        )
    })
}

/// One node in detail.
pub fn node_report(view: &ClusterView, node: &str, now: SystemTime) -> Option<String> {
    let object = view
        .mesh_nodes
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(node))?;
    let mut out = String::new();
    let Some(status) = &object.status else {
        let _ = writeln!(out, "node {node}: its agent has not reported yet");
        return Some(out);
    };
    let state = if status.silent_at(now) {
        "SILENT"
    } else if status.ready {
        "ready"
    } else {
        "NOT READY"
    };
    let _ = writeln!(
        out,
        "node {node}: {state} (fail mode {}), last heartbeat {} (every {}s)",
        status.fail_mode,
        heartbeat_age(status, now),
        status.heartbeat_interval_seconds
    );
    let _ = writeln!(
        out,
        "  version   {} (revision {})",
        status.version, status.revision
    );
    let _ = writeln!(
        out,
        "  kernel    {} ({})",
        status.kernel.release,
        status.kernel.features.join(", ")
    );
    let _ = writeln!(
        out,
        "  pods      {} enrolled, {} pending",
        status.pods.enrolled, status.pods.pending
    );
    let _ = writeln!(
        out,
        "  certs     first expiry {}",
        status.earliest_certificate_expiry.as_deref().map_or(
            "- (no certificates)".to_owned(),
            |at| format!("{at} (in {})", expiry(status, now))
        )
    );
    let _ = writeln!(out, "  config    {} rejected", status.config_error_count);
    let problems = problems(Some(status), now);
    if !problems.is_empty() {
        let _ = writeln!(out, "\nPROBLEMS");
        for problem in problems {
            let _ = writeln!(out, "  {problem}");
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::meshnode::{PendingPod, PodCounts, format_time};

    fn mesh_node(name: &str, status: MeshNodeStatus) -> MeshNode {
        let mut object = MeshNode::new(name, Default::default());
        object.status = Some(status);
        object
    }

    #[test]
    fn problems_come_first_and_say_what_is_wrong() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let healthy = MeshNodeStatus {
            version: "0.1.0".into(),
            revision: "abc".into(),
            ready: true,
            pods: PodCounts {
                enrolled: 4,
                pending: 0,
            },
            heartbeat_time: format_time(now),
            heartbeat_interval_seconds: 30,
            ..Default::default()
        };
        let pending = MeshNodeStatus {
            pods: PodCounts {
                enrolled: 2,
                pending: 1,
            },
            pending_pods: vec![PendingPod {
                pod: "shop/cart".into(),
                reason: "has no processes".into(),
            }],
            ..healthy.clone()
        };
        let silent = MeshNodeStatus {
            heartbeat_time: format_time(now - Duration::from_secs(600)),
            ..healthy.clone()
        };
        let view = ClusterView {
            mesh_nodes: vec![
                mesh_node("a-healthy", healthy),
                mesh_node("b-pending", pending),
                mesh_node("c-silent", silent),
            ],
            nodes_without_agent: vec!["d-bare".into()],
        };
        let report = report(&view, now);
        assert!(
            report.starts_with(
                "cluster: 4 nodes, 2 ready, 3 with problems; 10 pods enrolled, 1 pending"
            ),
            "{report}"
        );
        let order: Vec<usize> = ["b-pending", "c-silent", "d-bare", "a-healthy"]
            .iter()
            .map(|n| report.find(&format!("  {n} ")).expect(n))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{report}");
        assert!(
            report.contains("b-pending: pod shop/cart pending: has no processes"),
            "{report}"
        );
        assert!(
            report.contains("c-silent: agent silent: no heartbeat for 10m00s"),
            "{report}"
        );
        assert!(report.contains("d-bare: no MeshNode"), "{report}");
        assert!(!report.contains("a-healthy:"), "{report}");
        let detail = node_report(&view, "c-silent", now).unwrap();
        assert!(detail.starts_with("node c-silent: SILENT"), "{detail}");
        assert!(node_report(&view, "zz", now).is_none());
    }
}
