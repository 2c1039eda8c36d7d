//! Passing the node from one agent to the next: a starting agent inherits its predecessor's
//! listeners and takes over once its certificates are held; a running one hands its listeners
//! to a successor and stops. The admin ports pass with the node.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    admin::{self, AdminState, Endpoints},
    config::AgentConfig,
    datapath::Datapath,
    lifecycle::{
        drain::Drain,
        handoff::{self, HandoffAddress},
    },
    pods::enrolment::Enrolments,
};

/// After SIGTERM, how long the agent keeps serving in case a successor is about to connect.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(2);
/// After a takeover, how long the admin port may still be held by the predecessor (one older
/// than the exclusive admin port closes it just after confirming, not before).
const ADMIN_PORT_WAIT: Duration = Duration::from_secs(5);

/// This agent between its predecessor, if any, and its successor, if one comes.
pub(super) struct Succession {
    /// The agent that still serves the node until this one takes over.
    predecessor: Option<handoff::Predecessor>,
    /// Tells adopted listeners to accept: set once this agent serves the node.
    taken_over: watch::Sender<bool>,
    admin_addresses: Vec<(SocketAddr, Endpoints)>,
    admin_listeners: admin::Listeners,
    events: mpsc::Sender<handoff::Event>,
    /// What a successor asks, through the handoff socket.
    pub(super) successor: mpsc::Receiver<handoff::Event>,
    server: Option<JoinHandle<()>>,
    /// Set at SIGTERM while a successor may still come: serve on until then.
    pub(super) stop_at: Option<Instant>,
    successor_connected: bool,
    /// Begun when a successor takes the listeners over.
    drain: Drain,
}

impl Succession {
    /// Opens the admin ports and the handoff socket now when there is no predecessor; with
    /// one, they are bound once it has closed its own, at the takeover.
    pub(super) async fn start(
        config: &AgentConfig,
        predecessor: Option<handoff::Predecessor>,
        taken_over: watch::Sender<bool>,
        admin_state: &Arc<AdminState>,
        drain: &Drain,
    ) -> anyhow::Result<Self> {
        let admin_addresses: Vec<(SocketAddr, Endpoints)> =
            std::iter::once((config.admin_addr, Endpoints::All))
                .chain(
                    config
                        .metrics_addr
                        .map(|addr| (addr, Endpoints::MetricsOnly)),
                )
                .collect();
        let admin_listeners = if predecessor.is_none() {
            admin::Listeners::open(&admin_addresses, admin_state, Duration::ZERO).await?
        } else {
            admin::Listeners::default()
        };
        let (events, successor) = mpsc::channel(4);
        let server = if predecessor.is_none() {
            serve_successors(&config.handoff_socket, events.clone())
        } else {
            None
        };
        Ok(Self {
            predecessor,
            taken_over,
            admin_addresses,
            admin_listeners,
            events,
            successor,
            server,
            stop_at: None,
            successor_connected: false,
            drain: drain.clone(),
        })
    }

    /// Whether a predecessor still serves the node.
    pub(super) fn waiting_to_take_over(&self) -> bool {
        self.predecessor.is_some()
    }

    /// Takes the node over from the predecessor once every certificate is held.
    pub(super) async fn take_over_when_ready(
        &mut self,
        config: &AgentConfig,
        admin_state: &Arc<AdminState>,
        enrolments: &mut Enrolments,
        datapath: &Datapath,
    ) -> anyhow::Result<()> {
        if !admin::certificates_held(admin_state) {
            return Ok(());
        }
        let Some(predecessor) = self.predecessor.take() else {
            return Ok(());
        };
        // Accept first, then tell the predecessor to stop: no moment without an agent
        // accepting.
        self.taken_over.send_replace(true);
        enrolments.drop_unclaimed_listeners();
        take_over(predecessor).await;
        self.admin_listeners =
            admin::Listeners::open(&self.admin_addresses, admin_state, ADMIN_PORT_WAIT).await?;
        take_charge(enrolments, datapath, false);
        self.server = serve_successors(&config.handoff_socket, self.events.clone());
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(node = %config.node_name, "agent ready");
        Ok(())
    }

    /// Answers a successor. `Some(handed_over)` when the agent stops: `true` once the
    /// successor took the node over.
    pub(super) async fn on_event(
        &mut self,
        event: handoff::Event,
        config: &AgentConfig,
        admin_state: &AdminState,
        enrolments: &mut Enrolments,
    ) -> Option<bool> {
        match event {
            handoff::Event::Hello(reply) => {
                self.successor_connected = true;
                admin_state.ready.store(false, Ordering::Release);
                let _ = reply.send(enrolments.handed_listeners());
                if let Some(stop) = &mut self.stop_at {
                    // Stopping, but a successor is starting: serve until it takes over.
                    *stop = Instant::now() + config.drain_grace;
                }
                None
            }
            handoff::Event::Abandoned => {
                self.successor_connected = false;
                if self.stop_at.is_some() {
                    return Some(false);
                }
                admin_state.ready.store(true, Ordering::Release);
                None
            }
            handoff::Event::TakeOver(reply) => {
                enrolments.release_listeners();
                self.drain.begin();
                // The successor binds the admin ports once we confirm: free them first.
                admin_state.ready.store(false, Ordering::Release);
                self.admin_listeners.close().await;
                let _ = reply.send(self.drain.active());
                Some(true)
            }
        }
    }

    /// At SIGTERM: whether to stop now; otherwise serves on while a successor may come.
    pub(super) fn stop_now_at_sigterm(&mut self, config: &AgentConfig) -> bool {
        if self.server.is_none() || self.stop_at.is_some() {
            return true;
        }
        // In a surge rollout the SIGTERM can come before the successor has said hello (the
        // new pod's probe reached this agent): give it a moment.
        let wait = if self.successor_connected {
            config.drain_grace
        } else {
            SUCCESSOR_WAIT
        };
        tracing::info!(?wait, "SIGTERM: serving on while a successor may take over");
        self.stop_at = Some(Instant::now() + wait);
        false
    }

    /// Stops answering successors and closes the admin ports. Whether the agent was already
    /// stopping (a SIGTERM came) when the loop ended.
    pub(super) async fn close(mut self, handed_over: bool, admin_state: &AdminState) -> bool {
        // A successor that starts from now on finds nobody to answer it and opens its own
        // listeners (ours are closed or handed over by then).
        // (After a takeover the handoff task ends by itself, once it has confirmed it.)
        if let Some(server) = self.server.take().filter(|_| !handed_over) {
            server.abort();
        }
        drop(self.successor);
        admin_state.ready.store(false, Ordering::Release);
        self.admin_listeners.close().await;
        self.stop_at.is_some()
    }
}

/// Asks a running agent for its in-pod listeners. Without one (or when it cannot hand them
/// over) this agent opens its own.
pub(super) async fn inherit_listeners(
    address: &HandoffAddress,
) -> (Option<handoff::Predecessor>, Vec<handoff::HandedListener>) {
    let address = address.clone();
    let result = tokio::task::spawn_blocking(move || handoff::inherit(&address)).await;
    match result {
        Ok(Ok(Some((predecessor, listeners)))) => {
            tracing::info!(
                listeners = listeners.len(),
                "a running agent handed its listeners over; taking over when ready"
            );
            (Some(predecessor), listeners)
        }
        Ok(Ok(None)) => (None, Vec::new()),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not take the running agent's listeners over; opening new ones");
            (None, Vec::new())
        }
        Err(error) => {
            tracing::error!(%error, "the handoff task failed; opening new listeners");
            (None, Vec::new())
        }
    }
}

async fn take_over(predecessor: handoff::Predecessor) {
    match tokio::task::spawn_blocking(move || predecessor.take_over()).await {
        Ok(Ok(connections)) => {
            tracing::info!(
                predecessor_connections = connections,
                "took over from the previous agent; it drains its connections"
            )
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "the previous agent did not confirm the takeover; serving anyway")
        }
        Err(error) => tracing::error!(%error, "the takeover task failed; serving anyway"),
    }
}

/// Once this agent alone writes the node's datapath (at a start without a predecessor, or
/// once it has taken over): the pinned state is made exactly what the enrolled and held pods
/// imply, and what other agents pinned is retired. `alone`: no other agent runs at all, so
/// nobody is delivering.
pub(super) fn take_charge(enrolments: &Enrolments, datapath: &Datapath, alone: bool) {
    let mut repairs = enrolments.reconcile_datapath();
    if alone {
        repairs += datapath.clear_deliveries();
    }
    let retired = datapath.retire_other_versions();
    tracing::info!(
        repairs,
        retired,
        "pinned datapath reconciled with this node's pods"
    );
}

/// Serves the handoff socket for a future successor; without it, restarts open new
/// listeners (the fail mode covers the gap).
fn serve_successors(
    address: &HandoffAddress,
    events: mpsc::Sender<handoff::Event>,
) -> Option<tokio::task::JoinHandle<()>> {
    handoff::serve(address, events)
        .inspect_err(|error| {
            tracing::warn!(%error, "no listener handoff for a successor: a restart will have a gap")
        })
        .ok()
}
