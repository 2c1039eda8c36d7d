//! The agent's main loop: datapath up, admin up, then keep enrolment equal to the cluster
//! state until told to stop.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use nodemesh_common::FailMode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    admin::{self, AdminState, Endpoints},
    config::{AgentConfig, ClusterSourceConfig},
    datapath::Datapath,
    identity::{
        ca_client::CaClient,
        manager::{IdentityManager, PodRef},
        spiffe::SpiffeId,
        tls,
    },
    k8s::{
        installation::{Installation, InstallationWatch},
        snapshot::ClusterIndices,
        source::ClusterSource,
        status::SourceStatus,
    },
    lifecycle::{
        drain,
        handoff::{self, HandoffAddress},
    },
    pods::{
        cgroup,
        enrolment::{Adoption, Enrolments},
    },
    proxy::{
        hbone::client::HboneClient,
        inbound::{context::InboundContext, plaintext},
        outbound::{
            balance::Balancer,
            context::{HttpProxy, OutboundContext},
        },
    },
    state::{
        authorization::AuthorizationIndex,
        membership,
        node::{EnrolledPodView, NodeState},
        probes::ProbeIndex,
        routes::{self, RouteTable},
    },
    telemetry::{access::AccessLog, connections::ConnectionStats, metrics::Metrics, otlp::Tracer},
};

/// How often pods that could not be enrolled yet (no cgroup or process) are retried.
const PENDING_RETRY: Duration = Duration::from_millis(100);
/// Full re-read of the cluster state even without a change notification.
const RESYNC: Duration = Duration::from_secs(30);
/// How often a successor checks whether it can take over (it waits for its certificates).
const TAKEOVER_CHECK: Duration = Duration::from_millis(20);
/// After SIGTERM, how long the agent keeps serving in case a successor is about to connect.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(2);
/// After a takeover, how long the admin port may still be held by the predecessor (one older
/// than the exclusive admin port closes it just after confirming, not before).
const ADMIN_PORT_WAIT: Duration = Duration::from_secs(5);

pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    raise_open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run_agent(config))
}

async fn run_agent(config: AgentConfig) -> anyhow::Result<()> {
    // First of all: a running agent answers /readyz with 503 from the moment we say hello,
    // so the kubelet's probe, which reaches it until we take over, does not mistake it for us.
    let (mut predecessor, inherited) = inherit_listeners(&config.handoff_socket).await;
    let pods_root = cgroup::pods_root(&config.cgroup_root)?;
    let datapath = Arc::new(Datapath::load(&config, &pods_root)?);
    let stats = Arc::new(ConnectionStats::default());
    let identities = match &config.identity {
        None => {
            tracing::info!("no --ca-addr: running without workload certificates");
            None
        }
        Some(identity) => {
            let roots = tls::load_trust_bundle(&identity.trust_bundle)?;
            let client = CaClient::new(
                identity.ca_addr.clone(),
                identity.ca_server_name.clone(),
                tls::ca_client_config(roots)?,
                identity.token_file.clone(),
            );
            let manager = IdentityManager::new(client);
            tokio::spawn(Arc::clone(&manager).run());
            let roots = Arc::new(tls::load_trust_bundle(&identity.trust_bundle)?);
            Some((manager, roots))
        }
    };
    let (identities, roots) = identities.unzip();
    let balancer = Arc::new(Balancer::default());
    let metrics = Arc::new(Metrics::default());
    let access_log = AccessLog::new(config.access_log_sample_rate);
    let tracer = match &config.otlp_endpoint {
        Some(endpoint) => Tracer::start(endpoint, &config.node_name)?,
        None => Tracer::default(),
    };
    let indices = ClusterIndices::new(&config.trust_domain);
    let source_status = Arc::new(SourceStatus::default());
    let node_state = watch::Sender::new(Arc::new(NodeState::default()));
    let admin_state = Arc::new(AdminState {
        node_name: config.node_name.clone(),
        fail_mode: match config.fail_mode {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        },
        ready: false.into(),
        state: node_state.subscribe(),
        indices: indices.clone(),
        source_status: Arc::clone(&source_status),
        balancer: Arc::clone(&balancer),
        metrics: Arc::clone(&metrics),
        identities: identities.clone(),
        stats: Arc::clone(&stats),
        datapath: Arc::clone(&datapath),
    });
    let admin_addresses: Vec<(std::net::SocketAddr, Endpoints)> =
        std::iter::once((config.admin_addr, Endpoints::All))
            .chain(
                config
                    .metrics_addr
                    .map(|addr| (addr, Endpoints::MetricsOnly)),
            )
            .collect();
    // The ports are the agent's alone: with a predecessor, they are bound once it has
    // closed its own, at the takeover.
    let mut admin_listeners = if predecessor.is_none() {
        admin::Listeners::open(&admin_addresses, &admin_state, Duration::ZERO).await?
    } else {
        admin::Listeners::default()
    };
    let (taken_over, taken_over_rx) = watch::channel(predecessor.is_none());
    let (handoff_events, mut successor) = mpsc::channel(4);
    let mut handoff_server = None;
    if predecessor.is_none() {
        handoff_server = serve_successors(&config.handoff_socket, handoff_events.clone());
    }

    let mesh_tls = identities.clone().zip(roots);
    let outbound = Arc::new(OutboundContext {
        datapath: Arc::clone(&datapath),
        stats: Arc::clone(&stats),
        proxy_mark: config.proxy_mark,
        connect_timeout: config.connect_timeout,
        hbone: mesh_tls
            .clone()
            .map(|(identities, roots)| Arc::new(HboneClient::new(identities, roots))),
        workloads: Arc::clone(&indices.workloads),
        services: Arc::clone(&indices.services),
        state: node_state.subscribe(),
        http: HttpProxy::new(config.protocol_detection_timeout, balancer),
        metrics: Arc::clone(&metrics),
        access_log,
        tracer,
        max_connections_per_pod: config.max_connections_per_pod,
    });
    let inbound = mesh_tls.map(|(identities, roots)| {
        Arc::new(InboundContext {
            identities,
            roots,
            trust_domain: config.trust_domain.clone(),
            stats: Arc::clone(&stats),
            proxy_mark: config.proxy_mark,
            transparent_mark: config.transparent_mark,
            proc_sys_net: config.proc_sys_net.clone(),
            connect_timeout: config.connect_timeout,
            datapath: Arc::clone(&datapath),
            node_addresses: plaintext::node_addresses(),
            state: node_state.subscribe(),
            detect_wait: config.protocol_detection_timeout,
            workloads: Arc::clone(&indices.workloads),
            metrics: Arc::clone(&metrics),
            access_log,
        })
    });
    let mut enrolments = Enrolments::new(
        pods_root,
        config.outbound_port,
        config.proxy_mark,
        config.trust_domain.clone(),
        Arc::clone(&outbound),
        inbound.clone(),
        Adoption {
            listeners: inherited,
            taken_over: taken_over_rx,
        },
    );
    let installation = watch_installation(&config).await;
    let (mut cluster, mut changes) = match &config.cluster_source {
        ClusterSourceConfig::Manifests(dir) => {
            ClusterSource::manifests(dir, &config.node_name, indices.clone(), &source_status)?
        }
        ClusterSourceConfig::Kubernetes { sync_timeout } => {
            ClusterSource::api(
                &config.node_name,
                *sync_timeout,
                indices.clone(),
                Arc::clone(&source_status),
            )
            .await?
        }
    };

    let mut reconciler = Reconciler {
        cluster: &mut cluster,
        enrolments: &mut enrolments,
        config: &config,
        identities: identities.as_deref(),
        outbound: &outbound,
        state: &node_state,
    };
    reconciler.sync().await;
    if predecessor.is_none() {
        take_charge(reconciler.enrolments, &datapath, true);
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(node = %config.node_name, "agent ready");
    }

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut takeover_check = tokio::time::interval(TAKEOVER_CHECK);
    // Set at SIGTERM while a successor may still come: serve on until then.
    let mut stop_at: Option<tokio::time::Instant> = None;
    let mut successor_connected = false;
    let handed_over = loop {
        let retry = if reconciler.enrolments.has_pending() {
            PENDING_RETRY
        } else {
            RESYNC
        };
        tokio::select! {
            _ = changes.recv() => {}
            _ = tokio::time::sleep(retry) => {}
            _ = takeover_check.tick(), if predecessor.is_some() => {
                if admin::certificates_held(&admin_state)
                    && let Some(predecessor) = predecessor.take()
                {
                    // Accept first, then tell the predecessor to stop: no moment without an
                    // agent accepting.
                    taken_over.send_replace(true);
                    reconciler.enrolments.drop_unclaimed_listeners();
                    take_over(predecessor).await;
                    admin_listeners =
                        admin::Listeners::open(&admin_addresses, &admin_state, ADMIN_PORT_WAIT)
                            .await?;
                    take_charge(reconciler.enrolments, &datapath, false);
                    handoff_server =
                        serve_successors(&config.handoff_socket, handoff_events.clone());
                    admin_state.ready.store(true, Ordering::Release);
                    tracing::info!(node = %config.node_name, "agent ready");
                }
                continue;
            }
            Some(event) = successor.recv() => match event {
                handoff::Event::Hello(reply) => {
                    successor_connected = true;
                    admin_state.ready.store(false, Ordering::Release);
                    let _ = reply.send(reconciler.enrolments.handed_listeners());
                    if let Some(stop) = &mut stop_at {
                        // Stopping, but a successor is starting: serve until it takes over.
                        *stop = tokio::time::Instant::now() + config.drain_grace;
                    }
                    continue;
                }
                handoff::Event::Abandoned => {
                    successor_connected = false;
                    if stop_at.is_some() {
                        break false;
                    }
                    admin_state.ready.store(true, Ordering::Release);
                    continue;
                }
                handoff::Event::TakeOver(reply) => {
                    reconciler.enrolments.release_listeners();
                    drain::begin();
                    // The successor binds the admin ports once we confirm: free them first.
                    admin_state.ready.store(false, Ordering::Release);
                    admin_listeners.close().await;
                    let _ = reply.send(drain::active());
                    break true;
                }
            },
            () = sleep_until(stop_at) => break false,
            _ = terminate.recv() => {
                if handoff_server.is_none() || stop_at.is_some() {
                    break false;
                }
                // In a surge rollout the SIGTERM can come before the successor has said
                // hello (the new pod's probe reached this agent): give it a moment.
                let wait = if successor_connected { config.drain_grace } else { SUCCESSOR_WAIT };
                tracing::info!(?wait, "SIGTERM: serving on while a successor may take over");
                stop_at = Some(tokio::time::Instant::now() + wait);
                continue;
            }
            _ = interrupt.recv() => break false,
        }
        reconciler.sync().await;
    };
    // A successor that starts from now on finds nobody to answer it and opens its own
    // listeners (ours are closed or handed over by then).
    // (After a takeover the handoff task ends by itself, once it has confirmed it.)
    if let Some(server) = handoff_server.filter(|_| !handed_over) {
        server.abort();
    }
    drop(successor);
    admin_state.ready.store(false, Ordering::Release);
    admin_listeners.close().await;
    if handed_over {
        tracing::info!(
            connections = drain::active(),
            "a successor took over; serving the connections in flight until they end or SIGTERM"
        );
        if stop_at.is_none() {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        finish_connections(config.drain_grace).await;
        return Ok(());
    }
    if uninstalling(installation.as_ref()).await {
        tracing::info!(
            "the agent's DaemonSet is gone: uninstalling, removing everything from the node"
        );
        reconciler.enrolments.unenrol_all();
        crate::datapath::remove_pinned(&config.bpffs)?;
        return Ok(());
    }
    // Programs and maps stay pinned: while no agent runs, the fail mode decides.
    reconciler.enrolments.stop_capture_and_release().await;
    drain::begin();
    tracing::info!(
        connections = drain::active(),
        "agent stopping; capture stays attached and follows --fail-mode"
    );
    finish_connections(config.drain_grace).await;
    Ok(())
}

/// Asks a running agent for its in-pod listeners. Without one (or when it cannot hand them
/// over) this agent opens its own.
async fn inherit_listeners(
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
fn take_charge(enrolments: &Enrolments, datapath: &Datapath, alone: bool) {
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

/// Waits for the connections in flight to end, `grace` at most.
async fn finish_connections(grace: Duration) {
    let left = drain::settle(grace).await;
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
async fn watch_installation(config: &AgentConfig) -> Option<InstallationWatch> {
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

/// Everything one pass from cluster state to enrolment and identities touches.
struct Reconciler<'a> {
    cluster: &'a mut ClusterSource,
    enrolments: &'a mut Enrolments,
    config: &'a AgentConfig,
    identities: Option<&'a IdentityManager>,
    outbound: &'a OutboundContext,
    /// Where each version of the node's state is published; the current one holds the last
    /// good routes and policies, which survive a bad update.
    state: &'a watch::Sender<Arc<NodeState>>,
}

impl Reconciler<'_> {
    /// Re-reads the cluster state and brings enrolment, the workload index and the wanted
    /// identities in line with it.
    async fn sync(&mut self) {
        let (snapshot, errors) = self.cluster.refresh();
        for error in &errors {
            tracing::warn!(%error, "cluster state manifest rejected; keeping its last good contents");
        }
        // The workload and Service indices are kept current by the source itself; what is
        // left here is this node's share and the small kinds.
        {
            let services = self
                .outbound
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner());
            // Balancer state and idle connections of endpoints that are gone.
            let http = &self.outbound.http;
            http.balancer
                .retain(|endpoint| services.has_endpoint(endpoint));
            http.upstreams
                .retain(|endpoint| services.has_endpoint(endpoint));
        }
        let previous = Arc::clone(&self.state.borrow());
        let (routes, route_errors) = RouteTable::build(&snapshot.http_routes, &previous.routes);
        for error in &route_errors {
            tracing::warn!(%error, "HTTPRoute rejected; its last good version keeps serving");
        }
        if self.cluster.writes_status() {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let services = self
                .outbound
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let updates = routes::status_updates(
                &snapshot.http_routes,
                &route_errors,
                |service| services.contains(service),
                &now,
            );
            drop(services);
            self.cluster.write_route_statuses(updates);
        }
        let (authorization, policy_errors) = AuthorizationIndex::build(
            &snapshot.authorization_policies,
            snapshot.local_pods.values(),
            &previous.authorization,
        );
        for error in &policy_errors {
            tracing::warn!(%error, "AuthorizationPolicy rejected; its last good version keeps applying");
        }
        let config_errors: Vec<String> = errors
            .into_iter()
            .chain(route_errors.iter().map(ToString::to_string))
            .chain(policy_errors.iter().map(ToString::to_string))
            .collect();
        // What the cluster asks applies before enrolment acts on it (a pod enrolled now is
        // served under its policies), beside the pods as they were. Connections decided under
        // the previous version are decided again.
        self.state.send_replace(Arc::new(NodeState {
            routes: Arc::new(routes),
            authorization: Arc::new(authorization),
            probes: Arc::new(ProbeIndex::build(snapshot.local_pods.values())),
            enrolled: previous.enrolled.clone(),
            pending: previous.pending.clone(),
            config_errors,
        }));
        let desired = membership::local_meshed_pods(&snapshot);
        self.enrolments.reconcile(&desired).await;
        let enrolled = self.enrolments.enrolled_views();
        if let Some(identities) = self.identities {
            identities.set_desired(desired_identities(&enrolled, &self.config.trust_domain));
        }
        // Then what enrolment made of it. Only the pods' views change, so the connections
        // that watch for policy changes are not woken for it.
        let pending = self.enrolments.pending_views();
        self.state.send_if_modified(|state| {
            *state = Arc::new(NodeState {
                routes: Arc::clone(&state.routes),
                authorization: Arc::clone(&state.authorization),
                probes: Arc::clone(&state.probes),
                enrolled,
                pending,
                config_errors: state.config_errors.clone(),
            });
            false
        });
    }
}

/// Each identity of an enrolled pod, with one pod that carries it (the CA authorises the
/// request through that pod).
fn desired_identities(pods: &[EnrolledPodView], trust_domain: &str) -> BTreeMap<SpiffeId, PodRef> {
    let mut desired = BTreeMap::new();
    for pod in pods {
        match SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account) {
            Ok(id) => {
                desired.entry(id).or_insert_with(|| PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                });
            }
            Err(error) => {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %error, "pod has no valid identity")
            }
        }
    }
    desired
}
