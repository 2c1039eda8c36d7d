//! How the agent stops: after a successor took over, it serves the connections in flight;
//! otherwise capture stays attached and follows the fail mode, except at an uninstall, which
//! removes everything from the node.

use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    config::AgentConfig,
    k8s::installation::{Installation, InstallationWatch},
    lifecycle::drain::Drain,
    pods::enrolment::Enrolments,
};

/// SIGTERM and SIGINT, installed once.
pub(super) struct Signals {
    pub(super) terminate: Signal,
    pub(super) interrupt: Signal,
}

impl Signals {
    pub(super) fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn any(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Stops after a successor took over: the connections in flight are served until they end,
/// or until a signal (unless one came already, `stopping`) and the drain grace period.
pub(super) async fn after_handover(
    config: &AgentConfig,
    signals: &mut Signals,
    stopping: bool,
    drain: &Drain,
) -> anyhow::Result<()> {
    tracing::info!(
        connections = drain.active(),
        "a successor took over; serving the connections in flight until they end or SIGTERM"
    );
    if !stopping {
        signals.any().await;
    }
    finish_connections(config.drain_grace, drain).await;
    Ok(())
}

/// Stops without a successor: an uninstall removes everything from the node; any other stop
/// keeps programs and maps pinned, so while no agent runs, the fail mode decides.
pub(super) async fn without_successor(
    config: &AgentConfig,
    enrolments: &mut Enrolments,
    installation: Option<&InstallationWatch>,
    drain: &Drain,
) -> anyhow::Result<()> {
    if uninstalling(installation).await {
        tracing::info!(
            "the agent's DaemonSet is gone: uninstalling, removing everything from the node"
        );
        enrolments.unenrol_all();
        crate::datapath::remove_pinned(&config.bpffs)?;
        return Ok(());
    }
    enrolments.stop_capture_and_release().await;
    drain.begin();
    tracing::info!(
        connections = drain.active(),
        "agent stopping; capture stays attached and follows --fail-mode"
    );
    finish_connections(config.drain_grace, drain).await;
    Ok(())
}

/// Waits for the connections in flight to end, `grace` at most.
async fn finish_connections(grace: Duration, drain: &Drain) {
    let left = drain.settle(grace).await;
    if left == 0 {
        tracing::info!("all connections finished; exiting");
    } else {
        tracing::warn!(
            connections = left,
            ?grace,
            "drain grace period over; closing the connections left"
        );
    }
}

/// The watch of the agent's own DaemonSet (`--daemonset`), which tells an uninstall from a
/// restart at the stop. None without `--daemonset` or without a client: every stop then keeps
/// capture.
pub(super) async fn watch_installation(config: &AgentConfig) -> Option<InstallationWatch> {
    let daemonset = config.daemonset.as_ref()?;
    match crate::k8s::api::ApiWatch::infer_client().await {
        Ok(client) => Some(InstallationWatch::start(client, daemonset)),
        Err(error) => {
            tracing::warn!(%error, %daemonset, "no Kubernetes client to watch the agent's DaemonSet; every stop keeps capture");
            None
        }
    }
}

/// Whether this stop is an uninstall: the agent's DaemonSet is gone or being deleted. When
/// that cannot be known (no --daemonset, nothing learnt yet), the answer is no: removing
/// capture by mistake would open meshed pods up, keeping it costs nothing.
async fn uninstalling(installation: Option<&InstallationWatch>) -> bool {
    let Some(installation) = installation else {
        return false;
    };
    match installation.at_stop().await {
        Installation::Removed => true,
        Installation::Installed => false,
        Installation::Unknown => {
            tracing::warn!("cannot tell whether this is an uninstall; keeping capture");
            false
        }
    }
}
