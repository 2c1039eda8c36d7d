//! Sources of cluster state: a directory of Kubernetes manifests (`--cluster-state`) or the
//! API server (`--kubernetes`), both producing the same `ClusterSnapshot`.

pub mod api;
pub mod cluster_state;
pub mod snapshot;
pub mod source;
