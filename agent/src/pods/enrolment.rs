//! Enrolment: bringing a meshed pod under capture and releasing it.
//!
//! Enrolling a pod opens the proxy's listeners in the pod first (outbound on its loopback,
//! HBONE on :15008, plaintext inbound on its loopback), then attaches inbound capture to its
//! network namespace and last adds its cgroup to the enrolment map, so no hook ever sends a
//! connection to a listener that does not exist yet. Un-enrolling does the reverse.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    sync::Arc,
};

use nodemesh_common::{INBOUND_STRICT, InboundPod};

use serde::Serialize;
use socket2::Domain;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    cgroup::{self, CgroupError},
    netns::{NetnsError, NetnsSockets},
    routing::{self, SourcePreservation},
};
use crate::{
    datapath::{Datapath, DatapathError},
    identity::spiffe::SpiffeId,
    proxy::{
        hbone::HBONE_PORT,
        inbound::{self, DestinationPod, InboundContext},
        outbound::{self, OutboundContext, SourcePod},
        plaintext,
    },
    state::membership::{MeshedPod, PeerAuthentication},
    telemetry::metrics::Peer,
};

/// Port of the plaintext inbound listener on each meshed pod's loopback (as Istio's 15006).
/// Nothing dials it: the inbound sk_lookup program hands connections to it.
pub const PLAINTEXT_INBOUND_PORT: u16 = 15006;

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("opening the outbound listener {addr} in the pod: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// An enrolled pod, as the config dump shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EnrolledPodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns_inode: u64,
    pub netns_cookie: u64,
    pub listeners: Vec<SocketAddr>,
    pub peer_authentication: PeerAuthentication,
    /// Whether plaintext arriving at the pod is captured (the node holds identities).
    pub inbound_capture: bool,
    /// Whether mTLS traffic reaches the application with the client pod's address.
    pub source_preservation: SourcePreservation,
}

/// A meshed pod that could not be enrolled yet, and why.
#[derive(Clone, Debug, Serialize)]
pub struct PendingPodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: String,
}

struct Enrolled {
    pod: MeshedPod,
    view: EnrolledPodView,
    /// The inbound side, when the node holds identities.
    destination: Option<Arc<DestinationPod>>,
    accept_loops: Vec<JoinHandle<()>>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        // Dropping the accept loops closes the listeners; proxied connections carry on.
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

/// The enrolled pods of this node.
pub struct Enrolments {
    pods_root: PathBuf,
    outbound_port: u16,
    proxy_mark: u32,
    trust_domain: String,
    /// Present when the node holds identities: each pod then gets an HBONE listener.
    inbound: Option<Arc<InboundContext>>,
    datapath: Arc<Datapath>,
    outbound: Arc<OutboundContext>,
    enrolled: BTreeMap<String, Enrolled>,
    pending: BTreeMap<String, PendingPodView>,
}

impl Enrolments {
    pub fn new(
        pods_root: PathBuf,
        outbound_port: u16,
        proxy_mark: u32,
        trust_domain: String,
        outbound: Arc<OutboundContext>,
        inbound: Option<Arc<InboundContext>>,
    ) -> Self {
        Self {
            pods_root,
            outbound_port,
            proxy_mark,
            trust_domain,
            inbound,
            datapath: Arc::clone(&outbound.datapath),
            outbound,
            enrolled: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Makes the enrolled set equal to `desired` (keyed by pod UID). Pods that cannot be
    /// enrolled yet (no cgroup or process yet) stay pending until the next call.
    pub async fn reconcile(&mut self, desired: &BTreeMap<String, MeshedPod>) {
        let leaving: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(uid, enrolled)| {
                !desired
                    .get(*uid)
                    .is_some_and(|pod| same_but_mode(pod, &enrolled.pod))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in leaving {
            self.unenroll(&uid);
        }
        for (uid, enrolled) in &mut self.enrolled {
            if let Some(pod) = desired.get(uid)
                && pod.peer_authentication != enrolled.pod.peer_authentication
            {
                Self::change_mode(&self.datapath, enrolled, pod.peer_authentication);
            }
        }
        self.pending.retain(|uid, _| desired.contains_key(uid));
        for (uid, pod) in desired {
            if self.enrolled.contains_key(uid) {
                continue;
            }
            match self.enroll(pod).await {
                Ok(enrolled) => {
                    tracing::info!(
                        pod = %pod.display_name(), cgroup = %enrolled.view.cgroup.display(),
                        netns_inode = enrolled.view.netns_inode, "pod enrolled"
                    );
                    self.pending.remove(uid);
                    self.enrolled.insert(uid.clone(), enrolled);
                }
                Err(error) => {
                    let reason = error.to_string();
                    if self.pending.get(uid).is_none_or(|p| p.reason != reason) {
                        tracing::info!(pod = %pod.display_name(), %reason, "pod not enrolled yet; will retry");
                    }
                    self.pending.insert(
                        uid.clone(),
                        PendingPodView {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            uid: uid.clone(),
                            reason,
                        },
                    );
                }
            }
        }
    }

    /// Switches an enrolled pod between STRICT and PERMISSIVE without re-enrolling it: the
    /// kernel's fallback (when no agent runs) and the proxy's decision change together.
    fn change_mode(datapath: &Datapath, enrolled: &mut Enrolled, mode: PeerAuthentication) {
        enrolled.pod.peer_authentication = mode;
        enrolled.view.peer_authentication = mode;
        if let Some(destination) = &enrolled.destination {
            destination.set_peer_authentication(mode);
        }
        if enrolled.view.inbound_capture
            && let Err(error) = datapath.set_inbound_mode(&enrolled.pod.ips, inbound_pod(mode))
        {
            tracing::error!(pod = %enrolled.pod.display_name(), %error, "updating the inbound mode in the kernel failed");
        }
        tracing::info!(pod = %enrolled.pod.display_name(), ?mode, "peer authentication changed");
    }

    /// Removes enrolment map entries and inbound capture that no enrolled pod owns (left by
    /// a previous agent).
    pub fn remove_stale_map_entries(&self) -> Result<(), DatapathError> {
        let ours: Vec<u64> = self.enrolled.values().map(|e| e.view.cgroup_id).collect();
        for cgroup_id in self.datapath.enrolled_cgroups()? {
            if !ours.contains(&cgroup_id) {
                self.datapath.unenroll_cgroup(cgroup_id)?;
                tracing::info!(cgroup_id, "removed stale enrolment");
            }
        }
        let captured = self.enrolled.values().filter(|e| e.view.inbound_capture);
        let uids: Vec<&str> = captured.clone().map(|e| e.pod.uid.as_str()).collect();
        let addrs: Vec<IpAddr> = captured.flat_map(|e| e.pod.ips.iter().copied()).collect();
        self.datapath.remove_stale_inbound(&uids, &addrs)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn enrolled_views(&self) -> Vec<EnrolledPodView> {
        self.enrolled.values().map(|e| e.view.clone()).collect()
    }

    pub fn pending_views(&self) -> Vec<PendingPodView> {
        self.pending.values().cloned().collect()
    }

    async fn enroll(&self, pod: &MeshedPod) -> Result<Enrolled, EnrolError> {
        let cgroup = cgroup::find_pod_cgroup(&self.pods_root, &pod.uid)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup)?;
        let pid = cgroup::any_process(&cgroup)?;
        let sockets = NetnsSockets::for_process(pid)?;
        let (netns_cookie, netns_inode) = (sockets.cookie(), sockets.inode());

        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, self.outbound_port));
        let mut listeners = vec![(v4, self.listen(&sockets, v4).await?)];
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, self.outbound_port));
        match self.listen(&sockets, v6).await {
            Ok(listener) => listeners.push((v6, listener)),
            // A pod without IPv6 has no ::1; its IPv6 connects fail anyway.
            Err(error) => {
                tracing::info!(pod = %pod.display_name(), %error, "no IPv6 outbound listener")
            }
        }

        let sockets = Arc::new(sockets);
        let identity = SpiffeId::new(&self.trust_domain, &pod.namespace, &pod.service_account).ok();
        let source = Arc::new(SourcePod {
            display_name: pod.display_name(),
            namespace: pod.namespace.clone(),
            workload: pod.workload.clone(),
            identity: identity.clone(),
            sockets: Arc::clone(&sockets),
        });
        let mut addrs: Vec<SocketAddr> = listeners.iter().map(|(addr, _)| *addr).collect();
        let mut accept_loops: Vec<JoinHandle<()>> = listeners
            .into_iter()
            .map(|(_, listener)| {
                tokio::spawn(outbound::serve(
                    listener,
                    Arc::clone(&source),
                    Arc::clone(&self.outbound),
                ))
            })
            .collect();
        let mut inbound_side = None;
        let mut source_preservation = SourcePreservation::default();
        if let (Some(inbound), Some(identity)) = (&self.inbound, identity) {
            let has_v6 = pod.ips.iter().any(IpAddr::is_ipv6);
            source_preservation =
                routing::enable_source_preservation(&sockets, inbound.transparent_mark, has_v6)
                    .unwrap_or_else(|error| {
                        tracing::warn!(pod = %pod.display_name(), %error, "applications in this pod will see connections from its own address");
                        SourcePreservation::default()
                    });
            let destination = Arc::new(DestinationPod::new(
                pod.display_name(),
                Peer {
                    workload: pod.workload.clone(),
                    namespace: pod.namespace.clone(),
                    principal: identity.to_string(),
                },
                identity,
                pod.ips.clone(),
                Arc::clone(&sockets),
                source_preservation,
                pod.peer_authentication,
            ));
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT));
            let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT));
            let mut hbone = vec![(v4, self.listen(&sockets, v4).await?)];
            if has_v6 {
                hbone.push((v6, self.listen(&sockets, v6).await?));
            }
            for (addr, listener) in hbone {
                addrs.push(addr);
                accept_loops.push(tokio::spawn(inbound::serve(
                    listener,
                    Arc::clone(&destination),
                    Arc::clone(inbound),
                )));
            }

            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, PLAINTEXT_INBOUND_PORT));
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, PLAINTEXT_INBOUND_PORT));
            let plaintext_v4 = self.listen(&sockets, v4).await?;
            let plaintext_v6 = if has_v6 {
                Some(self.listen(&sockets, v6).await?)
            } else {
                None
            };
            let by_address: Vec<_> = pod
                .ips
                .iter()
                .filter_map(|ip| match (ip, &plaintext_v6) {
                    (IpAddr::V4(_), _) => Some((*ip, plaintext_v4.as_fd())),
                    (IpAddr::V6(_), Some(v6)) => Some((*ip, v6.as_fd())),
                    (IpAddr::V6(_), None) => None,
                })
                .collect();
            self.datapath.capture_inbound(
                &pod.uid,
                sockets.netns(),
                inbound_pod(pod.peer_authentication),
                &by_address,
            )?;
            inbound_side = Some(Arc::clone(&destination));
            let plaintext = std::iter::once((v4, plaintext_v4))
                .chain(plaintext_v6.map(|listener| (v6, listener)));
            for (addr, listener) in plaintext {
                addrs.push(addr);
                accept_loops.push(tokio::spawn(plaintext::serve(
                    listener,
                    Arc::clone(&destination),
                    Arc::clone(inbound),
                )));
            }
        }
        let enrolled = Enrolled {
            pod: pod.clone(),
            view: EnrolledPodView {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                service_account: pod.service_account.clone(),
                ips: pod.ips.clone(),
                cgroup,
                cgroup_id,
                netns_inode,
                netns_cookie,
                listeners: addrs,
                peer_authentication: pod.peer_authentication,
                inbound_capture: inbound_side.is_some(),
                source_preservation,
            },
            destination: inbound_side,
            accept_loops,
        };
        // Last step: from here on the pod's connects are captured.
        self.datapath.enroll_cgroup(cgroup_id)?;
        Ok(enrolled)
    }

    /// Un-enrols every pod (uninstall): nothing of the mesh stays in any pod.
    pub fn unenroll_all(&mut self) {
        let uids: Vec<String> = self.enrolled.keys().cloned().collect();
        for uid in uids {
            self.unenroll(&uid);
        }
    }

    fn unenroll(&mut self, uid: &str) {
        if let Some(enrolled) = self.enrolled.remove(uid) {
            if let Err(error) = self.datapath.unenroll_cgroup(enrolled.view.cgroup_id) {
                tracing::error!(pod = %enrolled.pod.display_name(), %error, "removing enrolment failed");
            }
            if let Err(error) = self.datapath.release_inbound(uid, &enrolled.pod.ips) {
                tracing::error!(pod = %enrolled.pod.display_name(), %error, "removing inbound capture failed");
            }
            let preserved = enrolled.view.source_preservation;
            if let (Some(destination), Some(inbound)) = (&enrolled.destination, &self.inbound)
                && (preserved.ipv4 || preserved.ipv6)
                && let Err(error) = routing::disable_source_preservation(
                    &destination.sockets,
                    inbound.transparent_mark,
                    preserved.ipv6,
                )
            {
                tracing::warn!(pod = %enrolled.pod.display_name(), %error, "removing the pod's policy routing failed");
            }
            tracing::info!(pod = %enrolled.pod.display_name(), "pod un-enrolled");
        }
    }

    async fn listen(
        &self,
        sockets: &NetnsSockets,
        addr: SocketAddr,
    ) -> Result<TcpListener, EnrolError> {
        let listen_error = |source| EnrolError::Listen { addr, source };
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = sockets.tcp_socket(domain)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true).map_err(listen_error)?;
        }
        socket.set_reuse_address(true).map_err(listen_error)?;
        // The mark tells the connect hook that this listener is the proxy's.
        socket.set_mark(self.proxy_mark).map_err(listen_error)?;
        socket.bind(&addr.into()).map_err(listen_error)?;
        socket.listen(1024).map_err(listen_error)?;
        TcpListener::from_std(socket.into()).map_err(listen_error)
    }
}

/// Two desired states of a pod that differ at most in peer authentication (which is changed
/// in place rather than by re-enrolling) and workload name (a metrics label: relabelling a
/// pod must not interrupt its traffic).
fn same_but_mode(a: &MeshedPod, b: &MeshedPod) -> bool {
    MeshedPod {
        peer_authentication: b.peer_authentication,
        workload: b.workload.clone(),
        ..a.clone()
    } == *b
}

fn inbound_pod(mode: PeerAuthentication) -> InboundPod {
    let flags = match mode {
        PeerAuthentication::Strict => INBOUND_STRICT,
        PeerAuthentication::Permissive => 0,
    };
    InboundPod { flags, _pad: 0 }
}
