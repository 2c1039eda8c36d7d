//! The agent's parts, built once at the start: the datapath, the identities, the proxy's
//! contexts, the admin state, enrolment, and the channel of the node's state they all read.

use std::sync::Arc;

use nodemesh_common::FailMode;
use rustls::RootCertStore;
use tokio::sync::{mpsc, watch};

use crate::{
    admin::AdminState,
    config::{AgentConfig, ClusterSourceConfig},
    datapath::Datapath,
    dns::server::DnsContext,
    identity::{ca_client::CaClient, manager::IdentityManager, tls},
    k8s::{snapshot::ClusterIndices, source::ClusterSource, status::SourceStatus},
    lifecycle::drain::Drain,
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
        node::NodeState,
        services::{ServiceIndex, SharedServices},
        workloads::{SharedWorkloads, WorkloadIndex},
    },
    telemetry::{access::AccessLog, connections::ConnectionStats, metrics::Metrics, otlp::Tracer},
};

/// What the agent runs with, shared by its tasks.
pub(super) struct Node {
    pub(super) datapath: Arc<Datapath>,
    pub(super) identities: Option<Arc<IdentityManager>>,
    pub(super) admin: Arc<AdminState>,
    pub(super) outbound: Arc<OutboundContext>,
    pub(super) enrolments: Enrolments,
    /// The proxy's connections, drained when the agent stops serving.
    pub(super) drain: Drain,
    /// Where each version of the node's state is published.
    pub(super) state: watch::Sender<Arc<NodeState>>,
    /// The indices the cluster source keeps current (the proxies read them).
    indices: ClusterIndices,
    source_status: Arc<SourceStatus>,
}

/// What the proxy's contexts share with the admin state.
struct Shared {
    datapath: Arc<Datapath>,
    stats: Arc<ConnectionStats>,
    metrics: Arc<Metrics>,
    balancer: Arc<Balancer>,
    workloads: SharedWorkloads,
    services: SharedServices,
    state: watch::Sender<Arc<NodeState>>,
}

impl Node {
    /// Loads the datapath, starts the identity manager (with a CA) and builds the rest;
    /// `adoption` is what a predecessor handed over.
    pub(super) fn build(config: &AgentConfig, adoption: Adoption) -> anyhow::Result<Self> {
        let pods_root = cgroup::pods_root(&config.cgroup_root)?;
        let shared = Shared {
            datapath: Arc::new(Datapath::load(config, &pods_root)?),
            stats: Arc::default(),
            metrics: Arc::default(),
            balancer: Arc::default(),
            workloads: WorkloadIndex::shared(&config.trust_domain),
            services: ServiceIndex::shared(),
            state: watch::Sender::new(Arc::default()),
        };
        let mesh_tls = start_identities(config)?;
        let identities = mesh_tls.as_ref().map(|(manager, _)| Arc::clone(manager));
        let source_status = Arc::new(SourceStatus::default());
        let admin = admin_state(config, &shared, identities.clone(), &source_status);
        let drain = Drain::default();
        let (outbound, inbound) = contexts(config, &shared, mesh_tls, &drain)?;
        let dns = config.dns.as_ref().map(|dns| {
            Arc::new(DnsContext {
                port: dns.port,
                domain: dns.cluster_domain.clone(),
                forward_timeout: dns.forward_timeout,
                drain: drain.clone(),
                proxy_mark: config.proxy_mark,
                datapath: Arc::clone(&shared.datapath),
                services: Arc::clone(&shared.services),
                metrics: Arc::clone(&shared.metrics),
            })
        });
        let enrolments = Enrolments::new(
            pods_root,
            config.outbound_port,
            config.proxy_mark,
            config.trust_domain.clone(),
            Arc::clone(&outbound),
            inbound,
            adoption,
        )
        .with_dns(dns);
        Ok(Self {
            datapath: shared.datapath,
            identities,
            admin,
            outbound,
            enrolments,
            drain,
            state: shared.state,
            indices: ClusterIndices {
                workloads: shared.workloads,
                services: shared.services,
            },
            source_status,
        })
    }

    /// The cluster state's source (a manifest directory or the API server, synced), and its
    /// change notifications.
    pub(super) async fn cluster_source(
        &self,
        config: &AgentConfig,
    ) -> anyhow::Result<(ClusterSource, mpsc::Receiver<()>)> {
        Ok(match &config.cluster_source {
            ClusterSourceConfig::Manifests(dir) => ClusterSource::manifests(
                dir,
                &config.node_name,
                self.indices.clone(),
                &self.source_status,
            )?,
            ClusterSourceConfig::Kubernetes { sync_timeout, .. } => {
                ClusterSource::api(
                    &config.node_name,
                    *sync_timeout,
                    self.indices.clone(),
                    Arc::clone(&self.source_status),
                )
                .await?
            }
        })
    }
}

/// With a CA (`--ca-addr`): the identity manager, running, and the trust bundle.
fn start_identities(
    config: &AgentConfig,
) -> anyhow::Result<Option<(Arc<IdentityManager>, Arc<RootCertStore>)>> {
    let Some(identity) = &config.identity else {
        tracing::info!("no --ca-addr: running without workload certificates");
        return Ok(None);
    };
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
    Ok(Some((manager, roots)))
}

fn admin_state(
    config: &AgentConfig,
    shared: &Shared,
    identities: Option<Arc<IdentityManager>>,
    source_status: &Arc<SourceStatus>,
) -> Arc<AdminState> {
    Arc::new(AdminState {
        node_name: config.node_name.clone(),
        fail_mode: match config.fail_mode {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        },
        ready: false.into(),
        state: shared.state.subscribe(),
        workloads: Arc::clone(&shared.workloads),
        services: Arc::clone(&shared.services),
        source_status: Arc::clone(source_status),
        balancer: Arc::clone(&shared.balancer),
        metrics: Arc::clone(&shared.metrics),
        identities,
        stats: Arc::clone(&shared.stats),
        datapath: Arc::clone(&shared.datapath),
    })
}

/// The outbound context, and the inbound one when the node holds identities.
fn contexts(
    config: &AgentConfig,
    shared: &Shared,
    mesh_tls: Option<(Arc<IdentityManager>, Arc<RootCertStore>)>,
    drain: &Drain,
) -> anyhow::Result<(Arc<OutboundContext>, Option<Arc<InboundContext>>)> {
    let access_log = AccessLog::new(config.access_log_sample_rate);
    let tracer = match &config.otlp_endpoint {
        Some(endpoint) => Tracer::start(endpoint, &config.node_name)?,
        None => Tracer::default(),
    };
    let inbound = mesh_tls.clone().map(|(identities, roots)| {
        Arc::new(InboundContext {
            drain: drain.clone(),
            identities,
            roots,
            trust_domain: config.trust_domain.clone(),
            stats: Arc::clone(&shared.stats),
            proxy_mark: config.proxy_mark,
            transparent_mark: config.transparent_mark,
            proc_sys_net: config.proc_sys_net.clone(),
            connect_timeout: config.connect_timeout,
            datapath: Arc::clone(&shared.datapath),
            node_addresses: plaintext::node_addresses(),
            state: shared.state.subscribe(),
            detect_wait: config.protocol_detection_timeout,
            opaque_ports: config.opaque_ports.clone(),
            workloads: Arc::clone(&shared.workloads),
            metrics: Arc::clone(&shared.metrics),
            access_log,
            local_pods: Arc::default(),
        })
    });
    let outbound = Arc::new(OutboundContext {
        drain: drain.clone(),
        datapath: Arc::clone(&shared.datapath),
        stats: Arc::clone(&shared.stats),
        proxy_mark: config.proxy_mark,
        connect_timeout: config.connect_timeout,
        hbone: mesh_tls.map(|(identities, roots)| Arc::new(HboneClient::new(identities, roots))),
        workloads: Arc::clone(&shared.workloads),
        services: Arc::clone(&shared.services),
        state: shared.state.subscribe(),
        http: HttpProxy::new(
            config.protocol_detection_timeout,
            config.opaque_ports.clone(),
            Arc::clone(&shared.balancer),
        ),
        metrics: Arc::clone(&shared.metrics),
        access_log,
        tracer,
        max_connections_per_pod: config.max_connections_per_pod,
        same_node: inbound.clone().filter(|_| config.same_node_handoff),
    });
    Ok((outbound, inbound))
}
