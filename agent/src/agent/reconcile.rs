//! One pass from the cluster state to the node: the node's state built whole and published,
//! enrolment brought in line with it, and the identities its pods need.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

use crate::{
    config::AgentConfig,
    identity::{
        manager::{IdentityManager, PodRef},
        spiffe::SpiffeId,
    },
    k8s::source::ClusterSource,
    pods::enrolment::Enrolments,
    proxy::outbound::context::OutboundContext,
    state::{
        authorization::AuthorizationIndex,
        membership,
        node::{EnrolledPodView, NodeState},
        probes::ProbeIndex,
        routes::{self, RouteTable},
    },
};

/// Everything one pass from cluster state to enrolment and identities touches.
pub(super) struct Reconciler<'a> {
    pub(super) cluster: &'a mut ClusterSource,
    pub(super) enrolments: &'a mut Enrolments,
    pub(super) config: &'a AgentConfig,
    pub(super) identities: Option<&'a IdentityManager>,
    pub(super) outbound: &'a OutboundContext,
    /// Where each version of the node's state is published; the current one holds the last
    /// good routes and policies, which survive a bad update.
    pub(super) state: &'a watch::Sender<Arc<NodeState>>,
}

impl Reconciler<'_> {
    /// Re-reads the cluster state and brings enrolment, the workload index and the wanted
    /// identities in line with it.
    pub(super) async fn sync(&mut self) {
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
        let (routes, route_errors) = RouteTable::build(
            &snapshot.http_routes,
            &snapshot.grpc_routes,
            &previous.routes,
        );
        for error in &route_errors {
            tracing::warn!(%error, "route rejected; its last good version keeps serving");
        }
        if self.cluster.writes_status() {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let services = self
                .outbound
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let exists = |service: &str| services.contains(service);
            let mut updates =
                routes::status_updates(&snapshot.http_routes, &route_errors, exists, &now);
            updates.extend(routes::status_updates(
                &snapshot.grpc_routes,
                &route_errors,
                exists,
                &now,
            ));
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
        let service_errors = (self.outbound.services.read())
            .map_or_else(|p| p.into_inner().errors(), |s| s.errors());
        let config_errors: Vec<String> = errors
            .into_iter()
            .chain(service_errors)
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
        let dns_pods: Vec<u64> = enrolled
            .iter()
            .filter(|pod| pod.dns_capture)
            .map(|pod| pod.netns_cookie)
            .collect();
        if let Err(error) = self.outbound.datapath.set_dns_pods(&dns_pods) {
            tracing::warn!(%error, "updating the pods whose DNS is captured failed; retrying at the next pass");
        }
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
