//! The control plane's processes: etcd and kube-apiserver started, stopped (an outage) and
//! waited for, in the testbed's bridge namespace or on loopback under a keeper thread.

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::Duration,
};

use super::{ControlPlane, Host, SERVICE_CIDR};
use crate::{
    cleanup::{Tracked, kill_and_reap, lock},
    error::{IoContext, Result, TestbedError},
    exec::Placement,
    wait::wait_until,
};

impl ControlPlane {
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

/// A spawn request to the keeper thread: the command, and where to send the child.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns a loopback control plane's processes from one thread that lives as long as the
/// control plane, each with `PR_SET_PDEATHSIG` = SIGKILL: when that thread ends (the control
/// plane is dropped, or the test process exits, even killed), the kernel kills them, so a
/// control plane shared by a test binary's tests never outlives it.
pub(super) struct Keeper {
    requests: mpsc::Sender<SpawnRequest>,
    children: Mutex<Vec<(String, Child)>>,
}

impl Keeper {
    pub(super) fn start() -> Result<Self> {
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

    pub(super) fn spawn(&self, what: &str, command: Command) -> Result<()> {
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

    pub(super) fn take(&self, what: &str) -> Vec<Child> {
        let mut children = lock(&self.children);
        let (ours, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *children)
            .into_iter()
            .partition(|(name, _)| name == what);
        *children = others;
        ours.into_iter().map(|(_, child)| child).collect()
    }

    pub(super) fn take_all(&self) -> Vec<Child> {
        std::mem::take(&mut *lock(&self.children))
            .into_iter()
            .map(|(_, child)| child)
            .collect()
    }
}
