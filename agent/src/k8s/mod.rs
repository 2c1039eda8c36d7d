//! Sources of cluster state: a directory of Kubernetes manifests (`--cluster-state`) or the
//! API server (`--kubernetes`), both keeping the same compact indices and producing the same
//! `ClusterSnapshot`.

pub mod api;
pub mod cluster_state;
pub mod compact;
pub mod discovery;
pub mod installation;
pub mod intern;
pub mod labels;
pub mod meshnode;
pub mod objects;
pub mod sinks;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod table;
pub mod watch;
pub mod zone_policy;
