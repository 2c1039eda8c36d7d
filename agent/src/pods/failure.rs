//! Why enrolling a pod failed, and what enrolment had found by then (enough for `pending.rs`
//! to hold the pod closed).

use std::{net::SocketAddr, sync::Arc};

use super::cgroup::CgroupError;
use crate::{
    datapath::DatapathError,
    netns::{NetnsError, NetnsSockets},
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

/// What enrolling a pod found before it failed: enough to hold the pod closed.
pub struct Failed {
    pub error: EnrolError,
    pub cgroup_id: Option<u64>,
    /// The pod's network namespace, when the pod has a process in one of its own.
    pub sockets: Option<Arc<NetnsSockets>>,
}

impl Failed {
    pub(super) fn boxed(
        error: impl Into<EnrolError>,
        cgroup_id: Option<u64>,
        sockets: Option<Arc<NetnsSockets>>,
    ) -> Box<Self> {
        Box::new(Self {
            error: error.into(),
            cgroup_id,
            sockets,
        })
    }
}
