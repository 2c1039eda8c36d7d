//! Short-lived connections: connect() + 64-byte echo + close() (a reset, as the workload's
//! `connect-loop` closes by default), one after another, direct and captured (meshed pod to
//! meshed pod on the same node, through the node's proxy: handed from its outbound to its
//! inbound side, or over HBONE with `--agent-env NODEMESH_SAME_NODE_HBONE=true`).
//!
//! Besides the overall rate, each run records the rate of its first and of its last thousand
//! connections (a rate that falls as connections accumulate is something piling up per
//! connection), and the TIME_WAIT sockets the loop added in the client's, the server's and
//! the node's network namespaces: a proxy that closes first where the client reset
//! leaves them, and each new connect() on the same address pair then searches past them.

use anyhow::Context;
use nodemesh_testbed::{Pod, Testbed, time_wait_sockets};

use super::{
    ECHO_PORT,
    observe::{UsageRuns, Watch},
    probes::run_json,
    stats::Samples,
};

/// Bytes each transaction echoes.
const ECHO_BYTES: &str = "64";

/// Every run's figures for one path.
#[derive(Default)]
pub(super) struct PathRuns {
    /// Transactions/s over the whole loop.
    pub(super) rate: Vec<f64>,
    pub(super) first_thousand: Vec<f64>,
    pub(super) last_thousand: Vec<f64>,
    /// TIME_WAIT sockets the loop added: client pod, server pod, node.
    pub(super) time_wait: [Vec<f64>; 3],
}

/// The two paths.
#[derive(Default)]
pub(super) struct ShortLivedRuns {
    pub(super) direct: PathRuns,
    pub(super) captured: PathRuns,
}

/// One run of each path: `connects` transactions from `client` (non-meshed for direct, then
/// meshed) to a server on node1, watched as `watch` says (allocations and CPU per
/// connection, and perf samples of the captured path's loop when it has a directory).
pub(super) fn one_run(
    tb: &Testbed,
    workload: &str,
    connects: u64,
    [direct_server, meshed_server]: [&Pod; 2],
    runs: &mut ShortLivedRuns,
    usage: &mut UsageRuns,
    watch: Watch,
) -> anyhow::Result<()> {
    for (client, server, path, scenario) in [
        (
            ("plain", "outsider"),
            direct_server,
            &mut runs.direct,
            "short-lived, direct",
        ),
        (
            ("mesh", "client-a"),
            meshed_server,
            &mut runs.captured,
            "short-lived, meshed same node",
        ),
    ] {
        let target = format!("{}:{ECHO_PORT}", server.ipv4());
        let client_pod = tb.pod(client.0, client.1);
        let node = tb.node(server.node())?;
        let namespaces = [client_pod.netns(), server.netns(), node.netns()];
        // Earlier scenarios may have left some (the memory scenario's connections close
        // in order): what counts is what this loop adds.
        let before = namespaces.map(time_wait_sockets);
        let out = watch.measure(
            tb,
            usage,
            (scenario, client.0 == "mesh"),
            ("connection", connects as f64),
            || {
                run_json(
                    tb,
                    client,
                    workload,
                    &[
                        "connect-loop",
                        "--target",
                        &target,
                        "--count",
                        &connects.to_string(),
                        "--echo-bytes",
                        ECHO_BYTES,
                    ],
                )
            },
        )?;
        let per_connect = out["per_connect_ns"].as_f64().context("per_connect_ns")?;
        path.rate.push(1e9 / per_connect);
        let thousands: Vec<f64> = out["per_connect_ns_by_thousand"]
            .as_array()
            .context("per_connect_ns_by_thousand")?
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        if let (Some(first), Some(last)) = (thousands.first(), thousands.last()) {
            path.first_thousand.push(1e9 / first);
            path.last_thousand.push(1e9 / last);
        }
        for ((count, netns), before) in path.time_wait.iter_mut().zip(namespaces).zip(before) {
            let added = time_wait_sockets(netns)?.saturating_sub(before?);
            count.push(added as f64);
        }
    }
    Ok(())
}

/// The report's section.
pub(super) fn section(out: &mut String, connects: u64, runs: &ShortLivedRuns) {
    let direct = Samples(runs.direct.rate.clone());
    out.push_str(&format!(
        "\n### Short-lived connections: connect() + 64-byte echo + close(), same node\n\n\
         {connects} transactions per run, one after another, each closed by a reset as \
         `connect-loop` does; the rate of the first and of the last thousand says whether it \
         holds as connections accumulate, and the TIME_WAIT sockets are those the loop added \
         (counted before and after it).\n\n\
         | source | transactions/s | ratio to direct | first 1000/s | last 1000/s | TIME_WAIT added client / server / node |\n\
         |---|---:|---:|---:|---:|---:|\n"
    ));
    for (name, path) in [
        ("non-meshed pod to non-meshed pod (direct)", &runs.direct),
        (
            "meshed pod to meshed pod, captured (same node, through the node's proxy)",
            &runs.captured,
        ),
    ] {
        let rate = Samples(path.rate.clone());
        let thousand = |runs: &Vec<f64>| {
            if runs.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.0}", Samples(runs.clone()).median())
            }
        };
        let [client, server, node] = path.time_wait.clone().map(|v| Samples(v).median());
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | {:.3} | {} | {} | {client:.0} / {server:.0} / {node:.0} |\n",
            rate.median(),
            rate.spread(),
            rate.median() / direct.median(),
            thousand(&path.first_thousand),
            thousand(&path.last_thousand),
        ));
    }
}
