//! Sources of cluster state. Today: a directory of Kubernetes manifests (`--cluster-state`);
//! the API server watchers will feed the same `ClusterSnapshot`.

pub mod cluster_state;
