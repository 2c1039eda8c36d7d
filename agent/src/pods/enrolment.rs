//! Enrolment: bringing a meshed pod under capture and releasing it.
//!
//! Enrolling a pod opens the proxy's listeners on the pod's loopback first and only then
//! adds its cgroup to the enrolment map, so the connect hook never sends a connection to a
//! listener that does not exist yet. Un-enrolling does the reverse.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;
use socket2::Domain;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    cgroup::{self, CgroupError},
    netns::{NetnsError, NetnsSockets},
};
use crate::{
    datapath::{Datapath, DatapathError},
    identity::spiffe::SpiffeId,
    proxy::{
        hbone::HBONE_PORT,
        inbound::{self, DestinationPod, InboundContext},
        outbound::{self, OutboundContext, SourcePod},
    },
    state::membership::MeshedPod,
};

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
            .filter(|(uid, enrolled)| desired.get(*uid) != Some(&enrolled.pod))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in leaving {
            self.unenroll(&uid);
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

    /// Removes enrolment map entries that no enrolled pod owns (left by a previous agent).
    pub fn remove_stale_map_entries(&self) -> Result<(), DatapathError> {
        let ours: Vec<u64> = self.enrolled.values().map(|e| e.view.cgroup_id).collect();
        for cgroup_id in self.datapath.enrolled_cgroups()? {
            if !ours.contains(&cgroup_id) {
                self.datapath.unenroll_cgroup(cgroup_id)?;
                tracing::info!(cgroup_id, "removed stale enrolment");
            }
        }
        Ok(())
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
        if let (Some(inbound), Some(identity)) = (&self.inbound, identity) {
            let destination = Arc::new(DestinationPod {
                display_name: pod.display_name(),
                identity,
                ips: pod.ips.clone(),
                sockets: Arc::clone(&sockets),
            });
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT));
            let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT));
            let mut hbone = vec![(v4, self.listen(&sockets, v4).await?)];
            if pod.ips.iter().any(IpAddr::is_ipv6) {
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
            },
            accept_loops,
        };
        // Last step: from here on the pod's connects are captured.
        self.datapath.enroll_cgroup(cgroup_id)?;
        Ok(enrolled)
    }

    fn unenroll(&mut self, uid: &str) {
        if let Some(enrolled) = self.enrolled.remove(uid) {
            if let Err(error) = self.datapath.unenroll_cgroup(enrolled.view.cgroup_id) {
                tracing::error!(pod = %enrolled.pod.display_name(), %error, "removing enrolment failed");
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
