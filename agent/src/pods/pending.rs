//! Meshed pods that could not be enrolled (yet): no cgroup or process yet, or the proxy's
//! ports in the pod are taken. Such a pod is held as closed as a node without an agent holds
//! it: its cgroup stays in the enrolment map, so with no proxy listener in the pod its
//! connects follow the fail mode (`closed` refuses them), and its addresses stay under
//! inbound capture, so a STRICT pod drops plaintext. What a previous agent pinned for it is
//! kept for the same reason. Enrolment is retried until it succeeds.

use std::{fs::File, net::IpAddr, sync::Arc};

use super::{addresses::inbound_pod, failure::Failed};
use crate::{
    datapath::Datapath,
    netns::NetnsSockets,
    state::{membership::MeshedPod, node::PendingPodView},
};

/// A pending pod and what this agent holds for it.
pub(super) struct Pending {
    pub(super) view: PendingPodView,
    pub(super) pod: MeshedPod,
    /// The network namespace this agent attached inbound capture to (a retry does not
    /// attach it again; a missing pin is attached again by the reconciliation).
    held_netns: Option<Arc<NetnsSockets>>,
}

impl Pending {
    /// Holds `pod` closed with what `failed` found, replacing what an earlier hold of it
    /// (`previous`) kept: the cgroup in the enrolment map, and, when the node captures
    /// inbound (`inbound`), the pod's addresses with their mode and the inbound program on
    /// its network namespace.
    pub(super) fn hold(
        datapath: &Datapath,
        pod: &MeshedPod,
        failed: Failed,
        previous: Option<Pending>,
        inbound: bool,
    ) -> Pending {
        let reason = failed.error.to_string();
        let name = pod.display_name();
        if previous.as_ref().is_none_or(|p| p.view.reason != reason) {
            tracing::info!(pod = %name, %reason, "pod not enrolled yet; will retry");
        }
        let previous_cgroup = previous.as_ref().and_then(|p| p.view.cgroup_id);
        let mut held_netns = previous.and_then(|p| p.held_netns);
        if let Some(old) = previous_cgroup.filter(|old| failed.cgroup_id != Some(*old)) {
            unhold_cgroup(datapath, &name, old);
        }
        let mut cgroup_id = None;
        if let Some(id) = failed.cgroup_id {
            match datapath.enrol_cgroup(id) {
                Ok(()) => cgroup_id = Some(id),
                Err(error) => {
                    tracing::error!(pod = %name, %error, "holding the pending pod's cgroup failed")
                }
            }
            if previous_cgroup != Some(id) && cgroup_id.is_some() {
                tracing::info!(pod = %name, cgroup_id = id, "pending pod held closed: its connects follow the fail mode until it is enrolled");
            }
        }
        if inbound {
            let mode = inbound_pod(pod);
            if let Err(error) = datapath.set_inbound_mode(&pod.ips, mode) {
                tracing::error!(pod = %name, %error, "holding the pending pod's addresses failed");
            }
            let attached = held_netns.as_ref().map(|s| s.inode());
            let netns = failed.sockets.filter(|s| attached != Some(s.inode()));
            if let Some(sockets) = netns {
                match datapath.attach_inbound_link(&pod.uid, sockets.netns()) {
                    Ok(()) => held_netns = Some(sockets),
                    Err(error) => {
                        tracing::error!(pod = %name, %error, "attaching inbound capture to the pending pod failed")
                    }
                }
            }
        }
        Pending {
            view: PendingPodView {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                reason,
                cgroup_id,
                peer_authentication: pod.peer_authentication,
                inbound_held: inbound,
            },
            pod: pod.clone(),
            held_netns,
        }
    }

    /// The pod left the mesh (or the node) while pending: nothing of it stays pinned.
    pub(super) fn release(self, datapath: &Datapath) {
        let name = self.pod.display_name();
        if let Some(id) = self.view.cgroup_id {
            unhold_cgroup(datapath, &name, id);
        }
        if let Err(error) = datapath.release_inbound(&self.pod.uid, &self.pod.ips) {
            tracing::error!(pod = %name, %error, "removing the pending pod's inbound capture failed");
        }
        tracing::info!(pod = %name, "pending pod released");
    }

    /// Once the pod is enrolled: a cgroup held before it was recreated is not the pod's now.
    pub(super) fn enrolled(self, datapath: &Datapath, cgroup_id: u64) {
        if let Some(old) = self.view.cgroup_id.filter(|old| *old != cgroup_id) {
            unhold_cgroup(datapath, &self.pod.display_name(), old);
        }
    }

    /// The addresses whose inbound capture this hold keeps.
    pub(super) fn held_addresses(&self) -> &[IpAddr] {
        if self.view.inbound_held {
            &self.pod.ips
        } else {
            &[]
        }
    }

    /// The network namespace inbound capture was attached to, if this agent attached it.
    pub(super) fn held_netns(&self) -> Option<&File> {
        self.held_netns.as_ref().map(|s| s.netns())
    }
}

fn unhold_cgroup(datapath: &Datapath, pod: &str, cgroup_id: u64) {
    if let Err(error) = datapath.unenrol_cgroup(cgroup_id) {
        tracing::error!(%pod, %error, cgroup_id, "removing a held cgroup failed");
    }
}
