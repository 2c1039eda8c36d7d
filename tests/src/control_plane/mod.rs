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

use std::{
    collections::HashMap,
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{self, Scope},
};
use serde_json::Value;

use crate::{
    cleanup::{Shared, Tracked, kill_and_reap, lock},
    error::{IoContext, Result, TestbedError},
    exec::Placement,
    netns,
    wait::wait_until,
};

/// The API server's address on the testbed's bridge (nodes are 198.18.0.1 up to .253).
pub const API_SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The API server's port.
pub const API_SERVER_PORT: u16 = 6443;
/// The Service CIDR: tests give Services addresses in 198.18.200.0/23.
pub const SERVICE_CIDR: &str = "198.18.200.0/23";
/// The field manager of everything the testbed applies.
pub const FIELD_MANAGER: &str = "nodemesh-testbed";

const ADMIN_TOKEN_NAME: &str = "testbed-admin";

/// Where `scripts/testenv.sh` put the real components.
#[derive(Clone, Debug)]
pub struct Testenv {
    dir: PathBuf,
}

impl Testenv {
    /// `$NODEMESH_TESTENV`, or `/var/cache/nodemesh/testenv` as the script's default.
    pub fn locate() -> Result<Self> {
        let dir = std::env::var_os("NODEMESH_TESTENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/nodemesh/testenv"));
        let testenv = Self { dir };
        for binary in ["etcd", "kube-apiserver", "kubectl", "helm"] {
            testenv.bin(binary)?;
        }
        Ok(testenv)
    }

    /// A binary built by `scripts/testenv.sh`.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join("bin").join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(TestbedError::BinaryNotFound(format!(
                "{} does not exist: run scripts/setup.sh, which builds the test control plane \
                 (scripts/testenv.sh), or point NODEMESH_TESTENV at its output",
                path.display()
            )))
        }
    }

    /// The directory of Gateway API CRD manifests (standard channel).
    pub fn gateway_api_crds(&self) -> PathBuf {
        self.dir.join("gateway-api")
    }
}

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

    /// Server-side applies any object (typed or YAML) as the testbed's field manager.
    pub fn apply(&self, object: &impl serde::Serialize) -> Result<DynamicObject> {
        let value = serde_json::to_value(object)
            .map_err(|error| TestbedError::Other(format!("serialising an object: {error}")))?;
        let (api, name) = self.api_for(&value)?;
        let what = format!("applying {}", describe(&value));
        self.run(async move {
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(value),
            )
            .await
            .map_err(|source| TestbedError::Kube { what, source })
        })
    }

    /// Server-side applies `status` to the object's status subresource, as `manager`.
    pub fn apply_status(&self, object: &Value, manager: &str) -> Result<()> {
        let (api, name) = self.api_for(object)?;
        let what = format!("applying the status of {}", describe(object));
        let object = object.clone();
        let params = PatchParams::apply(manager).force();
        self.run(async move {
            api.patch_status(&name, &params, &Patch::Apply(object))
                .await
                .map(|_| ())
                .map_err(|source| TestbedError::Kube { what, source })
        })
    }

    /// Deletes the object `value` names (apiVersion, kind, metadata); a missing one is fine.
    pub fn delete(&self, value: &Value, grace_period_seconds: Option<u32>) -> Result<()> {
        let (api, name) = self.api_for(value)?;
        let what = format!("deleting {}", describe(value));
        self.run(async move {
            let params = kube::api::DeleteParams {
                grace_period_seconds,
                ..Default::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(source) => Err(TestbedError::Kube { what, source }),
            }
        })
    }

    /// Reads the object `value` names, if it exists.
    pub fn get(&self, value: &Value) -> Result<Option<DynamicObject>> {
        let (api, name) = self.api_for(value)?;
        let what = format!("reading {}", describe(value));
        self.run(async move {
            api.get_opt(&name)
                .await
                .map_err(|source| TestbedError::Kube { what, source })
        })
    }

    /// The API (resource and scope found by discovery, cached) for an object's kind.
    fn api_for(&self, value: &Value) -> Result<(Api<DynamicObject>, String)> {
        let field = |path: &str| value.pointer(path).and_then(Value::as_str);
        let (Some(api_version), Some(kind), Some(name)) = (
            field("/apiVersion"),
            field("/kind"),
            field("/metadata/name"),
        ) else {
            return Err(TestbedError::Other(format!(
                "an object needs apiVersion, kind and metadata.name: {value}"
            )));
        };
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, scope) = self.resource(&gvk)?;
        let api = match (scope, field("/metadata/namespace")) {
            (Scope::Cluster, _) => Api::all_with(self.client.clone(), &resource),
            (Scope::Namespaced, Some(namespace)) => {
                Api::namespaced_with(self.client.clone(), namespace, &resource)
            }
            (Scope::Namespaced, None) => {
                return Err(TestbedError::Other(format!(
                    "{kind} {name} is namespaced but names no namespace"
                )));
            }
        };
        Ok((api, name.to_owned()))
    }

    fn resource(&self, gvk: &GroupVersionKind) -> Result<(ApiResource, Scope)> {
        if let Some(found) = lock(&self.resources).get(gvk) {
            return Ok(found.clone());
        }
        let client = self.client.clone();
        let wanted = gvk.clone();
        let found = self.run(async move {
            discovery::pinned_kind(&client, &wanted)
                .await
                .map(|(resource, capabilities)| (resource, capabilities.scope))
                .map_err(|source| TestbedError::Kube {
                    what: format!(
                        "discovering {}/{} {}",
                        wanted.group, wanted.version, wanted.kind
                    ),
                    source,
                })
        })?;
        lock(&self.resources).insert(gvk.clone(), found.clone());
        Ok(found)
    }

    /// Runs `kubectl` with the admin kubeconfig in the bridge namespace.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(self.testenv.bin("kubectl")?);
        command
            .args(args)
            .env("KUBECONFIG", self.admin_kubeconfig());
        self.output_in_netns(command)
    }

    /// Runs `kubectl` and returns its stdout; fails with its stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.kubectl(args)?;
        if !output.status.success() {
            return Err(TestbedError::Command {
                command: format!("kubectl {}", args.join(" ")),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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

    /// Stops the API server (an outage); [`ControlPlane::start_api_server`] brings it back.
    pub fn stop_api_server(&self) -> Result<()> {
        self.stop("kube-apiserver")
    }

    /// Stops etcd (an outage); [`ControlPlane::start_etcd`] brings it back with its data.
    pub fn stop_etcd(&self) -> Result<()> {
        self.stop("etcd")
    }

    fn stop(&self, what: &str) -> Result<()> {
        let children: Vec<Child> = match &self.host {
            Host::Testbed { shared, .. } => {
                let mut res = lock(shared);
                let (ours, others) = std::mem::take(&mut res.children)
                    .into_iter()
                    .partition(|t| t.what == what);
                res.children = others;
                ours.into_iter().map(|t: Tracked| t.child).collect()
            }
            Host::Loopback(keeper) => keeper.take(what),
        };
        for mut child in children {
            kill_and_reap(&mut child).io_context(|| format!("stopping {what}"))?;
        }
        Ok(())
    }

    /// Starts etcd (again, with the same data) and waits until it serves.
    pub fn start_etcd(&self) -> Result<()> {
        let mut command = Command::new(self.testenv.bin("etcd")?);
        command.args([
            "-data-dir",
            &self.dir.join("etcd").display().to_string(),
            "-client-url",
            &self.addresses.etcd_client,
            "-peer-url",
            &self.addresses.etcd_peer,
        ]);
        self.spawn("etcd", command)?;
        let log = self.log_dir.join(format!("{}-etcd.log", self.log_prefix()));
        wait_until(Duration::from_secs(60), "etcd to be ready", || {
            Ok(std::fs::read_to_string(&log)?.contains("etcd ready"))
        })
    }

    /// Starts the API server (again) and waits until `/readyz` says ok.
    pub fn start_api_server(&self) -> Result<()> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        let mut command = Command::new(self.testenv.bin("kube-apiserver")?);
        let address = self.addresses.api_server;
        command.args([
            format!("--etcd-servers={}", self.addresses.etcd_client),
            format!("--bind-address={}", address.ip()),
            format!("--advertise-address={}", address.ip()),
            format!("--secure-port={}", address.port()),
            format!("--tls-cert-file={}", file("apiserver.crt")),
            format!("--tls-private-key-file={}", file("apiserver.key")),
            format!("--client-ca-file={}", file("ca.crt")),
            format!("--service-account-key-file={}", file("sa.pub")),
            format!("--service-account-signing-key-file={}", file("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            "--authorization-mode=Node,RBAC".to_owned(),
            format!("--token-auth-file={}", file("tokens.csv")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
        ]);
        command.args(&self.api_server_flags);
        self.spawn("kube-apiserver", command)?;
        self.wait_ready()
    }

    /// Waits until the API server's `/readyz` answers ok.
    pub fn wait_ready(&self) -> Result<()> {
        let client = self.client.clone();
        let log = self
            .log_dir
            .join(format!("{}-kube-apiserver.log", self.log_prefix()));
        let outcome = wait_until(
            Duration::from_secs(90),
            "the API server to be ready",
            || {
                let client = client.clone();
                self.run(async move {
                    let request = hyper::Request::get("/readyz")
                        .body(Vec::new())
                        .map_err(|e| TestbedError::Other(e.to_string()))?;
                    Ok(client
                        .request_text(request)
                        .await
                        .is_ok_and(|text| text.trim() == "ok"))
                })
            },
        );
        outcome.map_err(|error| {
            let tail = crate::util::tail(&log, 30);
            TestbedError::Other(format!("{error}\n--- {} ---\n{tail}", log.display()))
        })
    }

    pub(crate) fn spawn(&self, what: &str, mut command: Command) -> Result<()> {
        let log_path = self
            .log_dir
            .join(format!("{}-{what}.log", self.log_prefix()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .io_context(|| format!("opening {}", log_path.display()))?;
        let stderr = log
            .try_clone()
            .io_context(|| format!("duplicating {}", log_path.display()))?;
        command.stdin(Stdio::null()).stdout(log).stderr(stderr);
        match &self.host {
            Host::Testbed {
                netns,
                cgroup,
                shared,
            } => {
                let child = Placement::new(netns, cgroup)?.spawn(&mut command)?;
                lock(shared).children.push(Tracked {
                    what: what.to_owned(),
                    pod: None,
                    child,
                });
            }
            Host::Loopback(keeper) => keeper.spawn(what, command)?,
        }
        Ok(())
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

/// A spawn request to the keeper thread: the command, and where to send the child.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns a loopback control plane's processes from one thread that lives as long as the
/// control plane, each with `PR_SET_PDEATHSIG` = SIGKILL: when that thread ends (the control
/// plane is dropped, or the test process exits, even killed), the kernel kills them, so a
/// control plane shared by a test binary's tests never outlives it.
struct Keeper {
    requests: mpsc::Sender<SpawnRequest>,
    children: Mutex<Vec<(String, Child)>>,
}

impl Keeper {
    fn start() -> Result<Self> {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("control-plane-keeper".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    // SAFETY: prctl between fork and exec is async-signal-safe.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .io_context(|| "starting the control plane's keeper thread".to_owned())?;
        Ok(Self {
            requests,
            children: Mutex::new(Vec::new()),
        })
    }

    fn spawn(&self, what: &str, command: Command) -> Result<()> {
        let (reply, child) = mpsc::channel();
        let gone = || TestbedError::Other("the control plane's keeper thread is gone".into());
        self.requests.send((command, reply)).map_err(|_| gone())?;
        let child = child
            .recv()
            .map_err(|_| gone())?
            .io_context(|| format!("spawning {what}"))?;
        lock(&self.children).push((what.to_owned(), child));
        Ok(())
    }

    fn take(&self, what: &str) -> Vec<Child> {
        let mut children = lock(&self.children);
        let (ours, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *children)
            .into_iter()
            .partition(|(name, _)| name == what);
        *children = others;
        ours.into_iter().map(|(_, child)| child).collect()
    }

    fn take_all(&self) -> Vec<Child> {
        std::mem::take(&mut *lock(&self.children))
            .into_iter()
            .map(|(_, child)| child)
            .collect()
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

/// `kind namespace/name` of an object, for messages.
fn describe(value: &Value) -> String {
    let field = |path: &str| value.pointer(path).and_then(Value::as_str).unwrap_or("?");
    match value.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(namespace) => format!("{} {namespace}/{}", field("/kind"), field("/metadata/name")),
        None => format!("{} {}", field("/kind"), field("/metadata/name")),
    }
}

/// The cluster CA, the API server's serving certificate (for `api_server`), the
/// ServiceAccount signing key, the admin's static token and its kubeconfig.
fn write_credentials(dir: &Path, api_server: SocketAddr) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let rcgen_error = |e: rcgen::Error| TestbedError::Other(format!("generating a key: {e}"));
    let ca_key = KeyPair::generate().map_err(rcgen_error)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "nodemesh testbed cluster CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rcgen_error)?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().map_err(rcgen_error)?;
    let mut serving = CertificateParams::new(vec![
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "localhost".to_owned(),
    ])
    .map_err(rcgen_error)?;
    serving
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(api_server.ip()));
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let serving_cert = serving.signed_by(&serving_key, &ca).map_err(rcgen_error)?;

    let sa_key = KeyPair::generate().map_err(rcgen_error)?;
    let admin_token = hex_token()?;
    let files = [
        ("ca.crt", ca_cert.pem()),
        ("apiserver.crt", serving_cert.pem()),
        ("apiserver.key", serving_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
        (
            "tokens.csv",
            format!("{admin_token},{ADMIN_TOKEN_NAME},{ADMIN_TOKEN_NAME},system:masters\n"),
        ),
        ("admin.token", admin_token),
    ];
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents).io_context(|| format!("writing {}", path.display()))?;
    }
    let url = format!("https://{api_server}");
    write_kubeconfig(
        &dir.join("admin.kubeconfig"),
        &url,
        &dir.join("ca.crt"),
        &dir.join("admin.token"),
    )
}

fn hex_token() -> Result<String> {
    let bytes = crate::util::random_bytes::<16>()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, token_file: &Path) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {
            "server": url,
            "certificate-authority": ca.display().to_string(),
        }}],
        "users": [{"name": "user", "user": {"tokenFile": token_file.display().to_string()}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "user"}}],
        "current-context": "testbed",
    });
    let yaml = serde_yaml::to_string(&config).map_err(|source| TestbedError::Yaml {
        what: path.display().to_string(),
        source,
    })?;
    let mut file = File::create(path).io_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, yaml.as_bytes())
        .io_context(|| format!("writing {}", path.display()))
}
