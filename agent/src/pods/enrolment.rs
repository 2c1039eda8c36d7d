//! Enrolment: bringing a meshed pod under capture and releasing it.
//!
//! Enrolling a pod opens the proxy's listeners in the pod first (outbound on its loopback,
//! HBONE on :15008, plaintext inbound on its loopback), then attaches inbound capture to its
//! network namespace and last adds its cgroup to the enrolment map, so no hook ever sends a
//! connection to a listener that does not exist yet. Un-enrolling does the reverse.
//!
//! After a restart or upgrade the listeners are not opened but adopted: the previous agent
//! handed them over (`lifecycle::handoff`), and they start accepting only once this agent
//! takes over, while the previous one keeps serving them until then.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use socket2::Domain;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

mod sides;

use self::sides::Opening;

use super::{
    addresses::inbound_pod,
    cgroup,
    failure::{EnrolError, Failed},
    listeners::{Opened, PodListener, accept_queue_length},
    pending::Pending,
    routing,
};
use crate::{
    datapath::{Datapath, Expected},
    dns::server::DnsContext,
    identity::{manager::IdentityManager, spiffe::SpiffeId},
    lifecycle::handoff::{HandedListener, ListenerName, ListenerRole},
    netns::NetnsSockets,
    proxy::{
        inbound::{
            context::{DestinationPod, InboundContext},
            local::Registration,
        },
        outbound::context::OutboundContext,
    },
    state::{
        membership::MeshedPod,
        node::{EnrolledPodView, PendingPodView},
    },
};

/// How long a stopping agent waits for its outbound listeners' accept queues to empty.
const QUEUE_DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// How long a newly enrolled pod's listeners wait for its certificate before serving anyway.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(5);

/// Port of the plaintext inbound listener on each meshed pod's loopback (as Istio's 15006).
/// Nothing dials it: the inbound sk_lookup program hands connections to it.
pub const PLAINTEXT_INBOUND_PORT: u16 = 15006;

struct Enrolled {
    pod: MeshedPod,
    view: EnrolledPodView,
    /// The inbound side, when the node holds identities.
    destination: Option<Arc<DestinationPod>>,
    /// Lists `destination` for connections from the node's other meshed pods.
    _on_this_node: Option<Registration<DestinationPod>>,
    _accept_loops: AcceptLoops,
    /// A duplicate of each listening socket, to hand to a successor.
    listeners: Vec<(ListenerName, OwnedFd)>,
}

/// The accept loops of one pod's listeners; dropping them (un-enrolment, or an enrolment
/// that failed half-way) closes the listeners, while proxied connections carry on.
#[derive(Default)]
struct AcceptLoops(Vec<JoinHandle<()>>);

impl AcceptLoops {
    fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for AcceptLoops {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What a starting agent took over from its predecessor: its listeners, to adopt, and the
/// signal that this agent has taken over (true from the start when there was none).
pub struct Adoption {
    pub listeners: Vec<HandedListener>,
    pub taken_over: watch::Receiver<bool>,
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
    pending: BTreeMap<String, Pending>,
    /// Listeners the previous agent handed over and no pod has adopted yet.
    inherited: HashMap<(String, ListenerRole, SocketAddr), HandedListener>,
    /// Becomes true when this agent takes over from the previous one (at once when there was
    /// none); adopted listeners accept only from then on.
    taken_over: watch::Receiver<bool>,
    /// Present when pods' DNS is captured: each pod then gets a DNS listener.
    dns: Option<Arc<DnsContext>>,
}

impl Enrolments {
    pub fn new(
        pods_root: PathBuf,
        outbound_port: u16,
        proxy_mark: u32,
        trust_domain: String,
        outbound: Arc<OutboundContext>,
        inbound: Option<Arc<InboundContext>>,
        adoption: Adoption,
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
            inherited: adoption
                .listeners
                .into_iter()
                .map(|l| ((l.name.pod_uid.clone(), l.name.role, l.name.addr), l))
                .collect(),
            taken_over: adoption.taken_over,
            dns: None,
        }
    }

    /// Gives each pod that does not opt out a DNS listener (`dns/server.rs`).
    pub fn with_dns(mut self, dns: Option<Arc<DnsContext>>) -> Self {
        self.dns = dns;
        self
    }

    /// Duplicates of every in-pod listening socket, for a successor.
    pub fn handed_listeners(&self) -> Vec<HandedListener> {
        self.enrolled
            .values()
            .flat_map(|enrolled| &enrolled.listeners)
            .filter_map(|(name, fd)| match fd.try_clone() {
                Ok(fd) => Some(HandedListener {
                    name: name.clone(),
                    fd,
                }),
                Err(error) => {
                    tracing::error!(?name, %error, "duplicating a listener for the successor");
                    None
                }
            })
            .collect()
    }

    /// Stops accepting on every pod's listeners without un-enrolling anything: a successor
    /// serves them now. Connections in flight carry on.
    pub fn release_listeners(&mut self) {
        self.enrolled.clear();
        self.pending.clear();
        self.inherited.clear();
    }

    /// Stops the pods' outbound capture before closing the listeners, so that no connection
    /// is left in a listener's accept queue to be reset when it closes (a stop without a
    /// successor). Clearing a listener's mark makes the connect hook treat it as absent, so
    /// new connects follow the fail mode at once; the accept loops take what is queued; then
    /// the listeners close.
    pub async fn stop_capture_and_release(&mut self) {
        let outbound: Vec<&OwnedFd> = self
            .enrolled
            .values()
            .flat_map(|enrolled| &enrolled.listeners)
            .filter(|(name, _)| name.role == ListenerRole::Outbound)
            .map(|(_, fd)| fd)
            .collect();
        for fd in &outbound {
            if let Err(error) = socket2::SockRef::from(fd).set_mark(0) {
                tracing::warn!(%error, "unmarking an outbound listener");
            }
        }
        // A connect that passed the hook just before completes within its own system call;
        // two empty looks in a row, a millisecond apart, see it accepted.
        let deadline = tokio::time::Instant::now() + QUEUE_DRAIN_LIMIT;
        let mut empty_looks = 0;
        while empty_looks < 2 && tokio::time::Instant::now() < deadline {
            if outbound.iter().all(|fd| accept_queue_length(fd) == 0) {
                empty_looks += 1;
            } else {
                empty_looks = 0;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.release_listeners();
    }

    /// Closes inherited listeners of pods that were not enrolled again (gone meanwhile).
    pub fn drop_unclaimed_listeners(&mut self) {
        for ((uid, role, addr), _) in self.inherited.drain() {
            tracing::info!(pod_uid = %uid, ?role, %addr, "inherited listener of a pod no longer here; closed");
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
            self.unenrol(&uid);
        }
        for (uid, enrolled) in &mut self.enrolled {
            if let Some(pod) = desired.get(uid)
                && (pod.peer_authentication, pod.inbound_udp)
                    != (enrolled.pod.peer_authentication, enrolled.pod.inbound_udp)
            {
                Self::change_mode(&self.datapath, enrolled, pod);
            }
        }
        let gone: Vec<String> = (self.pending.keys())
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pending) = self.pending.remove(&uid) {
                pending.release(&self.datapath);
            }
        }
        for (uid, pod) in desired {
            if self.enrolled.contains_key(uid) {
                continue;
            }
            let previous = self.pending.remove(uid);
            match self.enrol(pod).await {
                Ok(enrolled) => {
                    tracing::info!(
                        pod = %pod.display_name(), cgroup = %enrolled.view.cgroup.display(),
                        netns_inode = enrolled.view.netns_inode, "pod enrolled"
                    );
                    if let Some(previous) = previous {
                        previous.enrolled(&self.datapath, enrolled.view.cgroup_id);
                    }
                    self.enrolled.insert(uid.clone(), enrolled);
                }
                Err(failed) => {
                    let inbound = self.inbound.is_some();
                    let held = Pending::hold(&self.datapath, pod, *failed, previous, inbound);
                    self.pending.insert(uid.clone(), held);
                }
            }
        }
    }

    /// Switches an enrolled pod between STRICT and PERMISSIVE, or its inbound UDP between
    /// allowed and denied, without re-enrolling it: the kernel's part (and its fallback when
    /// no agent runs) and the proxy's decision change together.
    fn change_mode(datapath: &Datapath, enrolled: &mut Enrolled, desired: &MeshedPod) {
        let mode = desired.peer_authentication;
        let udp = desired.inbound_udp;
        enrolled.pod.peer_authentication = mode;
        enrolled.pod.inbound_udp = udp;
        enrolled.view.peer_authentication = mode;
        enrolled.view.inbound_udp = udp;
        if let Some(destination) = &enrolled.destination {
            destination.set_peer_authentication(mode);
        }
        if enrolled.view.inbound_capture
            && let Err(error) = datapath
                .set_inbound_mode(&enrolled.view.inbound_addresses, inbound_pod(&enrolled.pod))
        {
            tracing::error!(pod = %enrolled.pod.display_name(), %error, "updating the inbound mode in the kernel failed");
        }
        tracing::info!(pod = %enrolled.pod.display_name(), ?mode, ?udp, "inbound mode changed");
    }

    /// Makes the pinned state exactly what the enrolled and held pods imply, repairing what
    /// a previous agent, another version or anything else left; returns how many repairs.
    pub fn reconcile_datapath(&self) -> usize {
        let mut expected = Expected::default();
        for enrolled in self.enrolled.values() {
            expected.cgroups.insert(enrolled.view.cgroup_id);
            let Some(destination) = enrolled.destination.as_ref() else {
                continue;
            };
            let mode = inbound_pod(&enrolled.pod);
            expected
                .inbound_links
                .insert(enrolled.pod.uid.clone(), Some(destination.sockets.netns()));
            for ip in &enrolled.view.inbound_addresses {
                expected.inbound.insert(*ip, mode);
                let plaintext = enrolled.listeners.iter().find(|(name, _)| {
                    name.role == ListenerRole::Plaintext && name.addr.is_ipv4() == ip.is_ipv4()
                });
                if let Some((_, fd)) = plaintext {
                    expected.listeners.insert(*ip, fd.as_fd());
                }
            }
        }
        for pending in self.pending.values() {
            expected.cgroups.extend(pending.view.cgroup_id);
            if pending.view.inbound_held {
                let mode = inbound_pod(&pending.pod);
                (expected.inbound).extend(pending.held_addresses().iter().map(|ip| (*ip, mode)));
                (expected.inbound_links).insert(pending.pod.uid.clone(), pending.held_netns());
            }
        }
        self.datapath.reconcile(&expected)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn enrolled_views(&self) -> Vec<EnrolledPodView> {
        self.enrolled.values().map(|e| e.view.clone()).collect()
    }

    pub fn pending_views(&self) -> Vec<PendingPodView> {
        self.pending.values().map(|p| p.view.clone()).collect()
    }

    /// Enrols `pod`; on failure says what was found of it, to hold it closed meanwhile.
    async fn enrol(&mut self, pod: &MeshedPod) -> Result<Enrolled, Box<Failed>> {
        let cgroup = cgroup::find_pod_cgroup(&self.pods_root, &pod.uid)
            .map_err(|error| Failed::boxed(error, None, None))?;
        let cgroup_id =
            cgroup::cgroup_id(&cgroup).map_err(|error| Failed::boxed(error, None, None))?;
        let found = Some(cgroup_id);
        let pid =
            cgroup::any_process(&cgroup).map_err(|error| Failed::boxed(error, found, None))?;
        let sockets = NetnsSockets::for_process(pid)
            .map(Arc::new)
            .map_err(|error| Failed::boxed(error, found, None))?;
        self.enrol_in(pod, cgroup, cgroup_id, Arc::clone(&sockets))
            .await
            .map_err(|error| Failed::boxed(error, found, Some(sockets)))
    }

    /// Opens (or adopts) the pod's listeners, attaches inbound capture and enrols its cgroup.
    async fn enrol_in(
        &mut self,
        pod: &MeshedPod,
        cgroup: PathBuf,
        cgroup_id: u64,
        sockets: Arc<NetnsSockets>,
    ) -> Result<Enrolled, EnrolError> {
        let (netns_cookie, netns_inode) = (sockets.cookie(), sockets.inode());
        let identity = SpiffeId::new(&self.trust_domain, &pod.namespace, &pod.service_account).ok();
        let mut opening = Opening {
            opened: Opened::new(&pod.uid, netns_inode),
            sockets,
            addrs: Vec::new(),
            accept_loops: AcceptLoops::default(),
            certificate: self
                .inbound
                .as_ref()
                .zip(identity.clone())
                .map(|(inbound, id)| (Arc::clone(&inbound.identities), id)),
        };
        self.serve_outbound(pod, identity.clone(), &mut opening)?;
        let destination = match (self.inbound.clone(), identity) {
            (Some(inbound), Some(identity)) => {
                Some(self.serve_inbound(pod, inbound, identity, &mut opening)?)
            }
            _ => None,
        };
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
                listeners: opening.addrs,
                peer_authentication: pod.peer_authentication,
                inbound_udp: pod.inbound_udp,
                dns_capture: pod.dns && self.dns.is_some(),
                inbound_capture: destination.is_some(),
                inbound_addresses: (destination.as_ref())
                    .map(|d| d.inbound_addresses.clone())
                    .unwrap_or_default(),
                source_preservation: (destination.as_ref())
                    .map(|d| d.source_preservation)
                    .unwrap_or_default(),
            },
            _on_this_node: (destination.as_ref().zip(self.inbound.as_ref()))
                .map(|(pod, inbound)| inbound.local_pods.register(&pod.ips, pod)),
            destination,
            _accept_loops: opening.accept_loops,
            listeners: opening.opened.duplicates,
        };
        // Last step: from here on the pod's connects are captured.
        self.datapath.enrol_cgroup(cgroup_id)?;
        Ok(enrolled)
    }

    /// Un-enrols every pod (uninstall): nothing of the mesh stays in any pod.
    pub fn unenrol_all(&mut self) {
        let uids: Vec<String> = self.enrolled.keys().cloned().collect();
        for uid in uids {
            self.unenrol(&uid);
        }
    }

    fn unenrol(&mut self, uid: &str) {
        if let Some(enrolled) = self.enrolled.remove(uid) {
            if let Err(error) = self.datapath.unenrol_cgroup(enrolled.view.cgroup_id) {
                tracing::error!(pod = %enrolled.pod.display_name(), %error, "removing enrolment failed");
            }
            if let Err(error) = self
                .datapath
                .release_inbound(uid, &enrolled.view.inbound_addresses)
            {
                tracing::error!(pod = %enrolled.pod.display_name(), %error, "removing inbound capture failed");
            }
            let preserved = enrolled.view.source_preservation;
            if let (Some(destination), Some(inbound)) = (&enrolled.destination, &self.inbound)
                && (preserved.ipv4 || preserved.ipv6)
                && let Err(error) = routing::disable_source_preservation(
                    &destination.sockets,
                    inbound.transparent_mark,
                    &inbound.proc_sys_net,
                    preserved.ipv6,
                )
            {
                tracing::warn!(pod = %enrolled.pod.display_name(), %error, "removing the pod's policy routing failed");
            }
            tracing::info!(pod = %enrolled.pod.display_name(), "pod un-enrolled");
        }
    }

    /// Runs an accept loop. One on an adopted listener waits until this agent takes over
    /// (the previous agent serves it until then); any waits for the pod's certificate,
    /// `CERTIFICATE_WAIT` at most, so that the pod's first connections queue in the backlog
    /// for the few milliseconds the CA takes instead of failing for want of a certificate.
    fn start(
        &self,
        adopted: bool,
        certificate: Option<&(Arc<IdentityManager>, SpiffeId)>,
        serve: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let mut taken_over = self.taken_over.clone();
        let certificate = certificate.cloned();
        tokio::spawn(async move {
            if adopted && taken_over.wait_for(|taken| *taken).await.is_err() {
                return;
            }
            if let Some((identities, id)) = certificate
                && tokio::time::timeout(CERTIFICATE_WAIT, identities.wait_held(&id))
                    .await
                    .is_err()
            {
                tracing::warn!(spiffe_id = %id, wait = ?CERTIFICATE_WAIT, "no certificate yet; serving the pod anyway (mesh connections fail until it arrives)");
            }
            serve.await;
        })
    }

    /// The pod's listener for `role` at `addr`: the one the previous agent handed over if it
    /// names this pod, namespace, role and address, else a new one.
    fn listen(
        &mut self,
        opened: &mut Opened,
        sockets: &NetnsSockets,
        role: ListenerRole,
        addr: SocketAddr,
    ) -> Result<PodListener, EnrolError> {
        let listen_error = |source| EnrolError::Listen { addr, source };
        let name = opened.name(role, addr);
        let inherited = self
            .inherited
            .remove(&(name.pod_uid.clone(), role, addr))
            .filter(|handed| handed.name.netns_inode == name.netns_inode);
        let (listener, adopted) = match inherited {
            Some(handed) => {
                let listener = std::net::TcpListener::from(handed.fd);
                listener.set_nonblocking(true).map_err(listen_error)?;
                (TcpListener::from_std(listener).map_err(listen_error)?, true)
            }
            None => (self.open_listener(sockets, addr)?, false),
        };
        let duplicate = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(listen_error)?;
        opened.duplicates.push((name, duplicate));
        Ok(PodListener {
            addr,
            listener,
            adopted,
        })
    }

    fn open_listener(
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
        inbound_udp: b.inbound_udp,
        workload: b.workload.clone(),
        ..a.clone()
    } == *b
}
