//! The two sides of an enrolled pod's traffic: its outbound listeners (the pod as a source)
//! and, when the node holds identities, its HBONE and plaintext listeners with inbound
//! capture (the pod as a destination).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsFd,
    sync::Arc,
};

use super::{AcceptLoops, EnrolError, Enrolments, PLAINTEXT_INBOUND_PORT};
use crate::{
    dns::{self, server::DnsContext},
    identity::{manager::IdentityManager, spiffe::SpiffeId},
    lifecycle::handoff::ListenerRole,
    netns::{NetnsSockets, SourcePreservation},
    peer::Peer,
    pods::{
        addresses::{self, inbound_pod},
        listeners::Opened,
        routing,
    },
    proxy::{
        hbone::HBONE_PORT,
        inbound::{
            self,
            context::{DestinationPod, InboundContext},
            plaintext,
        },
        limits::Budget,
        outbound::{self, context::SourcePod},
    },
    state::membership::MeshedPod,
};

/// What enrolling one pod has opened so far; dropped on an error, it closes all of it.
pub(super) struct Opening {
    pub(super) opened: Opened,
    pub(super) sockets: Arc<NetnsSockets>,
    /// The listeners' addresses, for the config dump.
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) accept_loops: AcceptLoops,
    /// The identity whose certificate the listeners wait for, with its manager.
    pub(super) certificate: Option<(Arc<IdentityManager>, SpiffeId)>,
}

impl Enrolments {
    /// Opens (or adopts) the pod's outbound listeners on its loopback and serves them.
    pub(super) fn serve_outbound(
        &mut self,
        pod: &MeshedPod,
        identity: Option<SpiffeId>,
        opening: &mut Opening,
    ) -> Result<(), EnrolError> {
        let sockets = &opening.sockets;
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, self.outbound_port));
        let mut listeners =
            vec![self.listen(&mut opening.opened, sockets, ListenerRole::Outbound, v4)?];
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, self.outbound_port));
        match self.listen(&mut opening.opened, sockets, ListenerRole::Outbound, v6) {
            Ok(listener) => listeners.push(listener),
            // A pod without IPv6 has no ::1; its IPv6 connects fail anyway.
            Err(error) => {
                tracing::info!(pod = %pod.display_name(), %error, "no IPv6 outbound listener")
            }
        }
        let source = Arc::new(SourcePod {
            display_name: pod.display_name(),
            namespace: pod.namespace.clone(),
            workload: pod.workload.clone(),
            identity,
            ips: pod.ips.clone(),
            sockets: Arc::clone(sockets),
            connections: Budget::new(
                "pod_outbound_connections",
                self.outbound.max_connections_per_pod,
            ),
        });
        if let Some(dns) = self.dns.clone().filter(|_| pod.dns) {
            let (listeners, adopted) = self.dns_sockets(&mut opening.opened, sockets, &dns);
            let serve =
                dns::server::serve_pod(pod.display_name(), Arc::clone(sockets), dns, listeners);
            opening.accept_loops.push(self.start(adopted, None, serve));
        }
        for l in listeners {
            opening.addrs.push(l.addr);
            let serve =
                outbound::serve(l.listener, Arc::clone(&source), Arc::clone(&self.outbound));
            (opening.accept_loops).push(self.start(l.adopted, opening.certificate.as_ref(), serve));
        }
        Ok(())
    }

    /// The pod's DNS sockets (IPv4, IPv6), handed over by the previous agent or opened now,
    /// and whether they were handed over (then they are read only once this agent has taken
    /// over). One that cannot be opened now is missing: the IPv4 one is bound when the port
    /// is free (a predecessor that does not hand it over holds it until it exits); a pod
    /// without IPv6 has no `::1`.
    fn dns_sockets(
        &mut self,
        opened: &mut Opened,
        sockets: &NetnsSockets,
        dns: &DnsContext,
    ) -> ([Option<UdpSocket>; 2], bool) {
        let mut adopted = false;
        let listeners = dns::server::listen_addresses(dns.port).map(|addr| {
            let inherited = (self.inherited)
                .remove(&(opened.pod_uid.clone(), ListenerRole::Dns, addr))
                .filter(|handed| handed.name.netns_inode == opened.netns_inode);
            let socket = match inherited {
                Some(handed) => {
                    adopted = true;
                    let socket = UdpSocket::from(handed.fd);
                    socket.set_nonblocking(true).map(|()| socket)
                }
                None => dns::server::bind(sockets, addr, dns.proxy_mark),
            };
            let with_duplicate = socket.and_then(|s| Ok((s.as_fd().try_clone_to_owned()?, s)));
            match with_duplicate {
                Ok((duplicate, socket)) => {
                    let name = opened.name(ListenerRole::Dns, addr);
                    opened.duplicates.push((name, duplicate));
                    Some(socket)
                }
                Err(error) => {
                    tracing::debug!(%addr, %error, "no DNS socket now");
                    None
                }
            }
        });
        (listeners, adopted)
    }

    /// The pod as a destination: its HBONE listeners, and its plaintext listeners with
    /// inbound capture attached to its network namespace.
    pub(super) fn serve_inbound(
        &mut self,
        pod: &MeshedPod,
        inbound: Arc<InboundContext>,
        identity: SpiffeId,
        opening: &mut Opening,
    ) -> Result<Arc<DestinationPod>, EnrolError> {
        let has_v6 = pod.ips.iter().any(IpAddr::is_ipv6);
        let source_preservation = routing::enable_source_preservation(
            &opening.sockets,
            inbound.transparent_mark,
            &inbound.proc_sys_net,
            has_v6,
        )
        .unwrap_or_else(|error| {
            tracing::warn!(pod = %pod.display_name(), %error, "applications in this pod will see connections from its own address");
            SourcePreservation::default()
        });
        let destination =
            Arc::new(self.destination(pod, identity, &opening.sockets, source_preservation));
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT));
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT));
        let sockets = &opening.sockets;
        let mut hbone = vec![self.listen(&mut opening.opened, sockets, ListenerRole::Hbone, v4)?];
        if has_v6 {
            hbone.push(self.listen(&mut opening.opened, sockets, ListenerRole::Hbone, v6)?);
        }
        for l in hbone {
            opening.addrs.push(l.addr);
            let serve =
                inbound::hbone::serve(l.listener, Arc::clone(&destination), Arc::clone(&inbound));
            (opening.accept_loops).push(self.start(l.adopted, opening.certificate.as_ref(), serve));
        }
        self.capture_plaintext(pod, &inbound, &destination, opening)?;
        Ok(destination)
    }

    /// The pod as its inbound listeners see it.
    fn destination(
        &self,
        pod: &MeshedPod,
        identity: SpiffeId,
        sockets: &Arc<NetnsSockets>,
        source_preservation: SourcePreservation,
    ) -> DestinationPod {
        DestinationPod::new(
            pod.display_name(),
            Peer {
                workload: pod.workload.clone(),
                namespace: pod.namespace.clone(),
                principal: identity.to_string(),
            },
            identity,
            pod.ips.clone(),
            Arc::clone(sockets),
            source_preservation,
            pod.peer_authentication,
        )
        .with_connection_limit(self.outbound.max_connections_per_pod)
        .with_inbound_addresses(addresses::inbound_addresses(
            pod,
            sockets.local_addresses(),
            |address| {
                (self.enrolled.values())
                    .find(|e| e.view.inbound_addresses.contains(address))
                    .map(|e| e.pod.display_name())
            },
        ))
    }

    /// Opens the plaintext listeners on the pod's loopback, hands them the pod's addresses
    /// (inbound capture) and serves them.
    fn capture_plaintext(
        &mut self,
        pod: &MeshedPod,
        inbound: &Arc<InboundContext>,
        destination: &Arc<DestinationPod>,
        opening: &mut Opening,
    ) -> Result<(), EnrolError> {
        let sockets = &opening.sockets;
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, PLAINTEXT_INBOUND_PORT));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, PLAINTEXT_INBOUND_PORT));
        let plaintext_v4 =
            self.listen(&mut opening.opened, sockets, ListenerRole::Plaintext, v4)?;
        let plaintext_v6 = if destination.inbound_addresses.iter().any(IpAddr::is_ipv6) {
            Some(self.listen(&mut opening.opened, sockets, ListenerRole::Plaintext, v6)?)
        } else {
            None
        };
        let by_address: Vec<_> = (destination.inbound_addresses.iter())
            .filter_map(|ip| match (ip, &plaintext_v6) {
                (IpAddr::V4(_), _) => Some((*ip, plaintext_v4.listener.as_fd())),
                (IpAddr::V6(_), Some(v6)) => Some((*ip, v6.listener.as_fd())),
                (IpAddr::V6(_), None) => None,
            })
            .collect();
        self.datapath
            .capture_inbound(&pod.uid, sockets.netns(), inbound_pod(pod), &by_address)?;
        for l in std::iter::once(plaintext_v4).chain(plaintext_v6) {
            opening.addrs.push(l.addr);
            let serve = plaintext::serve(l.listener, Arc::clone(destination), Arc::clone(inbound));
            (opening.accept_loops).push(self.start(l.adopted, opening.certificate.as_ref(), serve));
        }
        Ok(())
    }
}
