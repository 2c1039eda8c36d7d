//! A real Kubernetes control plane for the testbed: etcd and kube-apiserver, built from their
//! published Go modules by `scripts/testenv.sh`, running in the testbed's bridge namespace at
//! [`API_SERVER_IP`], where every node reaches it the way a cluster's nodes reach theirs.
//!
//! The API server runs with `--authorization-mode=Node,RBAC`, ServiceAccount token signing
//! and the default admission plugins; the testbed installs the chart with `helm install`
//! (CRDs, RBAC, the DaemonSet, the CA) and the Gateway API CRDs. No
//! controller-manager, scheduler or kubelet runs: the testbed plays their parts (see
//! `api_cluster.rs`).
//!
//! The test process reaches the API server from inside the bridge namespace: its client
//! runs on a tokio runtime whose threads entered that namespace, and `kubectl`/`helm` run
//! there too.
//!
//! The same control plane also runs without a testbed, on the host's loopback with free
//! ports ([`ControlPlane::start_on_loopback`]): for tests of the agent's watches against the
//! real server, and for `cargo xtask scale`. It needs no root; its processes are spawned
//! with `PR_SET_PDEATHSIG` from a thread of its own, so they die with it, or with the test
//! process however that ends.

mod credentials;
mod objects;
mod processes;
mod testenv;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
};

use kube::{
    Client,
    api::{ApiResource, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::Scope,
};

pub use self::testenv::Testenv;
use self::{
    credentials::{write_credentials, write_kubeconfig},
    processes::Keeper,
};
use crate::{
    cleanup::{Shared, kill_and_reap},
    error::{IoContext, Result, TestbedError},
    exec::Placement,
    netns,
};

/// The API server's address on the testbed's bridge (nodes are 198.18.0.1 up to .253).
pub const API_SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The API server's port.
pub const API_SERVER_PORT: u16 = 6443;
/// The Service CIDR: tests give Services addresses in 198.18.200.0/23.
pub const SERVICE_CIDR: &str = "198.18.200.0/23";
/// The field manager of everything the testbed applies.
pub const FIELD_MANAGER: &str = "nodemesh-testbed";
/// Where the control plane's processes run.
enum Host {
    /// In a testbed's bridge namespace and cgroup, cleaned up with the testbed.
    Testbed {
        netns: String,
        cgroup: PathBuf,
        shared: Shared,
    },
    /// On the host's loopback, started by a keeper thread of its own.
    Loopback(Keeper),
}

/// The addresses the control plane serves on.
#[derive(Clone, Debug)]
struct Addresses {
    api_server: SocketAddr,
    etcd_client: String,
    etcd_peer: String,
}

/// The running control plane of one testbed (or of loopback tests).
pub struct ControlPlane {
    testenv: Testenv,
    dir: PathBuf,
    log_dir: PathBuf,
    host: Host,
    addresses: Addresses,
    /// Extra `kube-apiserver` flags (feature gates) of a loopback control plane.
    api_server_flags: Vec<String>,
    runtime: tokio::runtime::Runtime,
    client: Client,
    resources: Mutex<HashMap<GroupVersionKind, (ApiResource, Scope)>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir)
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Writes certificates and keys into `dir`, starts etcd and the API server in `netns`
    /// (their processes in `cgroup`, tracked in `shared`), and waits until it is ready.
    pub(crate) fn start(
        dir: &Path,
        log_dir: &Path,
        netns: &str,
        cgroup: &Path,
        shared: Shared,
    ) -> Result<Self> {
        let addresses = Addresses {
            api_server: (API_SERVER_IP, API_SERVER_PORT).into(),
            etcd_client: "http://127.0.0.1:2379".into(),
            etcd_peer: "http://127.0.0.1:2380".into(),
        };
        let host = Host::Testbed {
            netns: netns.to_owned(),
            cgroup: cgroup.to_owned(),
            shared,
        };
        let runtime = runtime_in_netns(netns)?;
        Self::start_on(dir, log_dir, host, addresses, Vec::new(), runtime)
    }

    /// A control plane on the host's loopback, in a scratch directory of its own that is
    /// removed when it is dropped: `nodemesh-cp-<pid>-<n>` in `/dev/shm` when there is one
    /// (RAM, not the disk: etcd preallocates 64 MiB write-ahead logs), else the temporary
    /// directory. Directories of processes that are gone are removed first.
    pub fn loopback(extra_api_server_flags: &[&str]) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .strip_prefix("nodemesh-cp-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("nodemesh-cp-{}-{n}", std::process::id()));
        Self::start_on_loopback(&dir, extra_api_server_flags)
    }

    /// A control plane on the host's loopback (free ports, no root needed), its files in
    /// `dir` (removed when it is dropped), `kube-apiserver` run with `extra_api_server_flags`
    /// too. Dropping it stops it.
    pub fn start_on_loopback(dir: &Path, extra_api_server_flags: &[&str]) -> Result<Self> {
        let port = || -> Result<u16> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")
                .io_context(|| "finding a free port".to_owned())?;
            Ok(listener
                .local_addr()
                .io_context(|| "finding a free port".to_owned())?
                .port())
        };
        let addresses = Addresses {
            api_server: (Ipv4Addr::LOCALHOST, port()?).into(),
            etcd_client: format!("http://127.0.0.1:{}", port()?),
            etcd_peer: format!("http://127.0.0.1:{}", port()?),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("control-plane")
            .build()
            .io_context(|| "building the control plane's runtime".to_owned())?;
        let flags = extra_api_server_flags
            .iter()
            .map(|f| (*f).to_owned())
            .collect();
        Self::start_on(
            dir,
            &dir.join("logs"),
            Host::Loopback(Keeper::start()?),
            addresses,
            flags,
            runtime,
        )
    }

    fn start_on(
        dir: &Path,
        log_dir: &Path,
        host: Host,
        addresses: Addresses,
        api_server_flags: Vec<String>,
        runtime: tokio::runtime::Runtime,
    ) -> Result<Self> {
        let testenv = Testenv::locate()?;
        std::fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(log_dir)
            .io_context(|| format!("creating {}", log_dir.display()))?;
        write_credentials(dir, addresses.api_server)?;
        let kubeconfig = dir.join("admin.kubeconfig");
        // Building a client reads its files only; it connects at the first request.
        let client = {
            let task = runtime.spawn(async move { client_from(&kubeconfig).await });
            runtime.block_on(task).map_err(|error| {
                TestbedError::Other(format!("building the admin client: {error}"))
            })??
        };
        let plane = Self {
            client,
            testenv,
            dir: dir.to_owned(),
            log_dir: log_dir.to_owned(),
            host,
            addresses,
            api_server_flags,
            runtime,
            resources: Mutex::new(HashMap::new()),
        };
        plane.start_etcd()?;
        plane.start_api_server()?;
        Ok(plane)
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addresses.api_server)
    }

    /// The API server's address.
    pub fn api_server_addr(&self) -> SocketAddr {
        self.addresses.api_server
    }

    /// The directory with the certificates, tokens, kubeconfigs and etcd's data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate the API server's serving certificate chains to.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A kubeconfig with the cluster-admin token (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The real components' binaries.
    pub fn testenv(&self) -> &Testenv {
        &self.testenv
    }

    /// The network namespace the control plane runs in (the testbed's bridge); empty for a
    /// loopback control plane, which runs in the caller's.
    pub fn netns(&self) -> &str {
        match &self.host {
            Host::Testbed { netns, .. } => netns,
            Host::Loopback(_) => "",
        }
    }

    /// The name its log files start with.
    fn log_prefix(&self) -> &str {
        match &self.host {
            Host::Testbed { netns, .. } => netns,
            Host::Loopback(_) => "control-plane",
        }
    }

    /// An admin client (its connections are made from the bridge namespace).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `future` on the control plane's runtime, whose threads live in the bridge
    /// namespace (so every connection it makes starts there).
    pub fn run<T, F>(&self, future: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let task = self.runtime.spawn(future);
        self.runtime
            .block_on(task)
            .map_err(|error| TestbedError::Other(format!("control plane task failed: {error}")))?
    }

    /// Writes a kubeconfig `name.kubeconfig` that authenticates with the token in
    /// `token_file` (read again by clients that reload it, as projected tokens are).
    pub fn write_kubeconfig(&self, name: &str, token_file: &Path) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        write_kubeconfig(&path, &self.url(), &self.ca_cert(), token_file)?;
        Ok(path)
    }

    /// Runs a command in the bridge namespace (the control plane's cgroup) to completion.
    pub fn output_in_netns(&self, mut command: Command) -> Result<Output> {
        command.stdin(Stdio::null());
        let program = command.get_program().to_string_lossy().into_owned();
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = match &self.host {
            Host::Testbed { netns, cgroup, .. } => {
                Placement::new(netns, cgroup)?.spawn(&mut command)?
            }
            Host::Loopback(_) => command
                .spawn()
                .io_context(|| format!("spawning {program}"))?,
        };
        child
            .wait_with_output()
            .io_context(|| format!("waiting for {program}"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Host::Loopback(keeper) = &self.host {
            for mut child in keeper.take_all() {
                let _ = kill_and_reap(&mut child);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A multi-thread runtime whose every thread has entered `netns` before it runs anything.
fn runtime_in_netns(netns: &str) -> Result<tokio::runtime::Runtime> {
    let namespace = Arc::new(netns::open(netns)?);
    let name = netns.to_owned();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(format!("cp-{name}"))
        .on_thread_start(move || {
            // SAFETY: setns on an fd the Arc keeps open; it changes only this thread.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "entering network namespace {name}: {}",
                    std::io::Error::last_os_error()
                );
            }
        })
        .build()
        .io_context(|| "building the control plane's runtime".to_owned())
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let what = || format!("loading {}", kubeconfig.display());
    let config = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| TestbedError::Other(format!("{}: {e}", what())))?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| TestbedError::Other(format!("{}: {e}", what())))?;
    Client::try_from(config).map_err(|source| TestbedError::Kube {
        what: what(),
        source,
    })
}
