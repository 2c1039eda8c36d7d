//! nodemesh testbed: a fake Kubernetes cluster made of network namespaces and cgroups.
//!
//! A [`Testbed`] has a bridge namespace, one namespace per node (each with its own agent) and
//! one per pod, kubelet-style cgroups (`<node>/kubepods/besteffort/pod<uid>/<container>`),
//! and a directory of Kubernetes YAML that the agents read as cluster state. Everything it
//! creates is named after the testbed and removed on drop, on `teardown`, from a Ctrl-C
//! handler (`teardown_all_registered`) or by a later run (`sweep_stale`).

#![warn(missing_docs)]

mod agent;
pub mod api_cluster;
mod ca;
mod cgroup;
mod cleanup;
pub mod cluster_state;
mod containerd;
pub mod control_plane;
pub mod docs;
mod error;
mod exec;
pub mod expansion;
mod host_network;
mod http;
mod image;
mod kubelet;
mod naming;
mod netns;
pub mod observability;
pub mod pinned;
mod pod;
mod resolver;
mod runtime_spec;
mod terminal;
mod testbed;
mod topology;
mod util;
mod wait;
mod workload;

use std::path::PathBuf;

pub use agent::{ADMIN_ADDR, AgentContainer, AgentOptions};
pub use ca::{CA_PORT, CaContainer, MeshCa};
pub use cgroup::cgroup2_root;
pub use cleanup::{TeardownReport, leftovers, sweep_stale, teardown_all_registered};
pub use containerd::Containerd;
pub use control_plane::{ControlPlane, Testenv};
pub use error::{Result, TestbedError};
pub use http::get_on_connection;
pub use image::ImageArchive;
pub use kubelet::ChartPods;
pub use naming::BPFFS_ROOT;
pub use netns::{
    HBONE_PORT, NETNS_DIR, established_connections, hbone_connections, time_wait_sockets,
};
pub use nix::sys::signal::Signal;
pub use pod::{Node, Pod};
pub use terminal::Tmux;
pub use testbed::{ClusterMode, Testbed, TestbedConfig};
pub use topology::{MESH_LABEL, NamespaceSpec, NodeSpec, PodSpec, TopologySpec};
pub use util::{cpu_seconds, is_root, rss_kib};
pub use wait::{POLL_INTERVAL, scaled, wait_until};
pub use workload::{DEFAULT_RUN_TIMEOUT, PodProcess};

/// Locates a workspace binary (`nodemesh`, `nodemesh-workload`); panics with advice if absent.
///
/// Uses `NODEMESH_BIN` / `NODEMESH_WORKLOAD_BIN` (generally `<NAME>_BIN`) if set, else the
/// binary next to the running executable (`target/<profile>/`, also from `.../deps/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    try_workspace_bin(name).unwrap_or_else(|error| panic!("{error}"))
}

/// Like [`workspace_bin`], returning an error instead of panicking.
pub fn try_workspace_bin(name: &str) -> Result<PathBuf> {
    let variable = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&variable) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(TestbedError::BinaryNotFound(format!(
                "{variable}={} is not a file",
                path.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|source| TestbedError::Io {
        what: "finding the running executable".into(),
        source,
    })?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    // Test executables live in target/<profile>/deps/, binaries one level up.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(TestbedError::BinaryNotFound(format!(
            "{name} not found at {} (and {variable} is not set): run `cargo build --workspace` first",
            candidate.display()
        )))
    }
}
