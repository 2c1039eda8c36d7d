//! The agent's main loop: datapath up, admin up, then keep enrolment equal to the cluster
//! state until told to stop.
//!
//! `node` builds the agent's parts, `succession` passes the node between agents (takeover
//! and handoff), `reconcile` is one pass from the cluster state to the node, `mesh_node`
//! reports the node in its MeshNode object, `stop` the way out. This file puts them in
//! order.

mod mesh_node;
mod node;
mod reconcile;
mod stop;
mod succession;

use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use self::{node::Node, reconcile::Reconciler, stop::Signals, succession::Succession};
use crate::{
    admin::AdminState,
    config::{AgentConfig, ClusterSourceConfig},
    datapath::Datapath,
    pods::enrolment::Adoption,
};

/// How often pods that could not be enrolled yet (no cgroup or process) are retried.
const PENDING_RETRY: Duration = Duration::from_millis(100);
/// Full re-read of the cluster state even without a change notification.
const RESYNC: Duration = Duration::from_secs(30);
/// How often a successor checks whether it can take over (it waits for its certificates).
const TAKEOVER_CHECK: Duration = Duration::from_millis(20);

pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    raise_open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run_agent(config))
}

async fn run_agent(config: AgentConfig) -> anyhow::Result<()> {
    // First of all: a running agent answers /readyz with 503 from the moment we say hello,
    // so the kubelet's probe, which reaches it until we take over, does not mistake it for us.
    let (predecessor, inherited) = succession::inherit_listeners(&config.handoff_socket).await;
    let alone = predecessor.is_none();
    let (taken_over, taken_over_rx) = watch::channel(alone);
    let adoption = Adoption {
        listeners: inherited,
        taken_over: taken_over_rx,
    };
    let mut node = Node::build(&config, adoption)?;
    let mut succession =
        Succession::start(&config, predecessor, taken_over, &node.admin, &node.drain).await?;
    let installation = stop::watch_installation(&config).await;
    let (mut cluster, changes) = node.cluster_source(&config).await?;
    let _mesh_node = match (&config.cluster_source, cluster.client()) {
        (
            ClusterSourceConfig::Kubernetes {
                node_status_interval,
                ..
            },
            Some(client),
        ) => Some(mesh_node::start(
            client,
            std::sync::Arc::clone(&node.admin),
            *node_status_interval,
        )),
        _ => None,
    };

    let mut reconciler = Reconciler {
        cluster: &mut cluster,
        enrolments: &mut node.enrolments,
        config: &config,
        identities: node.identities.as_deref(),
        outbound: &node.outbound,
        state: &node.state,
    };
    reconciler.sync().await;
    if alone {
        succession::take_charge(reconciler.enrolments, &node.datapath, true);
        node.admin
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(node = %config.node_name, "agent ready");
    }

    let mut signals = Signals::install()?;
    let handed_over = serve(
        &config,
        &mut reconciler,
        &mut succession,
        &mut signals,
        changes,
        (&node.admin, &node.datapath),
    )
    .await?;
    let stopping = succession.close(handed_over, &node.admin).await;
    if handed_over {
        return stop::after_handover(&config, &mut signals, stopping, &node.drain).await;
    }
    stop::without_successor(
        &config,
        reconciler.enrolments,
        installation.as_ref(),
        &node.drain,
    )
    .await
}

/// Keeps the node equal to the cluster state until the agent stops; whether a successor took
/// the node over.
async fn serve(
    config: &AgentConfig,
    reconciler: &mut Reconciler<'_>,
    succession: &mut Succession,
    signals: &mut Signals,
    mut changes: mpsc::Receiver<()>,
    (admin_state, datapath): (&std::sync::Arc<AdminState>, &Datapath),
) -> anyhow::Result<bool> {
    let mut takeover_check = tokio::time::interval(TAKEOVER_CHECK);
    loop {
        let retry = if reconciler.enrolments.has_pending() {
            PENDING_RETRY
        } else {
            RESYNC
        };
        tokio::select! {
            _ = changes.recv() => {}
            _ = tokio::time::sleep(retry) => {}
            _ = takeover_check.tick(), if succession.waiting_to_take_over() => {
                succession
                    .take_over_when_ready(config, admin_state, reconciler.enrolments, datapath)
                    .await?;
                continue;
            }
            Some(event) = succession.successor.recv() => {
                match succession.on_event(event, config, admin_state, reconciler.enrolments).await {
                    Some(handed_over) => return Ok(handed_over),
                    None => continue,
                }
            }
            () = sleep_until(succession.stop_at) => return Ok(false),
            _ = signals.terminate.recv() => {
                if succession.stop_now_at_sigterm(config) {
                    return Ok(false);
                }
                continue;
            }
            _ = signals.interrupt.recv() => return Ok(false),
        }
        reconciler.sync().await;
    }
}

/// Every proxied connection holds two descriptors (three with a delivery in the pod): the
/// soft limit (often 1,024) would cap the node at a few hundred connections, so the agent
/// raises it to the hard limit the container runtime grants, as proxies do.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a local struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::info!(
            open_files = limit.rlim_cur,
            "open file limit raised to the hard limit"
        );
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open file limit");
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
