//! The nodemesh agent of each node: starting it in the node, stopping it, its admin API.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    Pod, Testbed, api_cluster,
    cleanup::{self, lock},
    containerd::{Containerd, RunFiles},
    error::{IoContext, Result, TestbedError},
    exec::{Placement, wait_or_kill},
    http,
    kubelet::KubeletPod,
    util::tail,
    wait::{POLL_INTERVAL, wait_until},
};

/// The agent's admin API address inside its node's network namespace.
pub const ADMIN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15020));

/// How many log lines agent errors quote.
const LOG_TAIL_LINES: usize = 40;

/// How the agent is started.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `--fail-mode`: `open` or `closed`.
    pub fail_mode: String,
    /// Appended to the agent's command line.
    pub extra_args: Vec<String>,
    /// How long to wait for `/readyz` to answer 200.
    pub ready_timeout: Duration,
    /// Whether `start_agent` waits for readiness at all.
    pub wait_ready: bool,
    /// Run the image through containerd as the chart's DaemonSet runs it, instead of the
    /// binary in the node (then `fail_mode` and `extra_args` do not apply: the manifest's
    /// args do).
    pub container: Option<AgentContainer>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            fail_mode: "open".to_owned(),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            wait_ready: true,
            container: None,
        }
    }
}

/// The agent as the chart's DaemonSet runs it: its pod template, the image, the runtime.
#[derive(Clone, Debug)]
pub struct AgentContainer {
    /// The testbed's containerd, with the image imported.
    pub runtime: Containerd,
    /// The image reference to run (the DaemonSet's, as installed).
    pub image: String,
    /// The DaemonSet's pod template spec (`ChartPods::agent`).
    pub pod: k8s_openapi::api::core::v1::PodSpec,
    /// Names the agent resolves through `/etc/hosts`, standing in for cluster DNS and the
    /// Service's virtual IP (e.g. the CA's Service name to the CA pod's address).
    pub hosts: Vec<(String, IpAddr)>,
}

/// An agent the testbed started: the process it spawned and, when that is a container
/// runtime's client (`ctr run`, which exits with the container and forwards signals but
/// SIGKILL), the file where the runtime wrote the agent's own pid.
#[derive(Debug)]
pub(crate) struct AgentProcess {
    child: Child,
    container: Option<RunFiles>,
}

impl AgentProcess {
    /// The agent's pid as the host sees it (what `/readyz` reports with the host's PID
    /// namespace); `None` until a container has started.
    fn pid(&self) -> Option<u32> {
        match &self.container {
            None => Some(self.child.id()),
            Some(container) => container.pid(),
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends `signal` to the agent itself.
    fn signal(&mut self, signal: Signal) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("the container has no pid yet"))?;
        kill(
            Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
            signal,
        )
        .map_err(io::Error::from)
    }

    /// Waits (at most `timeout`) for the agent to exit, then SIGKILLs it (the container's
    /// process, not only its client); returns whether it had to.
    fn wait_or_kill(&mut self, timeout: Duration) -> Result<bool> {
        if self.container.is_none() {
            return wait_or_kill(&mut self.child, timeout);
        }
        let exited = wait_until(timeout, "the agent's container to exit", || {
            Ok(self.child.try_wait()?.is_some())
        });
        if exited.is_ok() {
            return Ok(false);
        }
        self.kill_and_reap()
            .io_context(|| "killing the agent's container".into())?;
        Ok(true)
    }

    /// SIGKILLs the agent and reaps what the testbed spawned (a container's client exits
    /// with the container, after removing it).
    pub(crate) fn kill_and_reap(&mut self) -> io::Result<()> {
        if self.container.is_none() {
            return cleanup::kill_and_reap(&mut self.child);
        }
        let _ = self.signal(Signal::SIGKILL);
        let _ = wait_or_kill(&mut self.child, Duration::from_secs(10));
        self.child.wait().map(|_| ())
    }
}

impl Testbed {
    /// The listener handoff socket of `node`'s agents (in the node's counterpart of the
    /// hostPath `/run/nodemesh`; the agent makes the directory).
    pub fn handoff_socket(&self, node: &str) -> PathBuf {
        self.node_run_dir(node).join("handoff.sock")
    }

    /// The file the agent of `node` appends its stdout and stderr to.
    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.log_dir.join(format!("{}-{node}-agent.log", self.name))
    }

    /// The agent's full command line (without the binary) for this node and options.
    pub fn agent_args(&self, node: &str, options: &AgentOptions) -> Result<Vec<String>> {
        self.node(node)?;
        let mut args = vec![
            "agent".to_owned(),
            "--node-name".to_owned(),
            node.to_owned(),
        ];
        match &self.control_plane {
            // The kubeconfig comes through KUBECONFIG, as in-cluster config would.
            Some(_) => args.extend([
                "--kubernetes".to_owned(),
                "--daemonset".to_owned(),
                format!(
                    "{}/{}",
                    crate::api_cluster::SYSTEM_NAMESPACE,
                    crate::api_cluster::AGENT_DAEMONSET
                ),
            ]),
            None => args.extend([
                "--cluster-state".to_owned(),
                self.cluster_state_dir.display().to_string(),
            ]),
        }
        args.extend([
            "--cgroup-root".to_owned(),
            self.cgroup_root(node).display().to_string(),
            "--bpffs".to_owned(),
            self.bpffs_dir(node).display().to_string(),
            "--fail-mode".to_owned(),
            options.fail_mode.clone(),
            "--admin-addr".to_owned(),
            ADMIN_ADDR.to_string(),
            // Each node its own, as each node has its own /run/nodemesh.
            "--handoff-socket".to_owned(),
            self.handoff_socket(node).display().to_string(),
            // The log is a file for people to read (the default there would be JSON).
            "--log-format".to_owned(),
            "text".to_owned(),
        ]);
        if let Some((_, threads)) = self.config.worker_threads.iter().find(|(n, _)| n == node) {
            args.extend(["--worker-threads".to_owned(), threads.to_string()]);
        }
        args.extend(options.extra_args.iter().cloned());
        Ok(args)
    }

    /// Starts the agent of `node` in the node's netns and `system` cgroup; waits for `/readyz`.
    pub fn start_agent(&self, node: &str, options: &AgentOptions) -> Result<()> {
        {
            let mut res = lock(&self.shared);
            if let Some(agent) = res.agents.get_mut(node) {
                if agent.try_wait().ok().flatten().is_none() {
                    return Err(self.agent_error(node, "an agent is already running"));
                }
                res.agents.remove(node);
            }
        }
        self.spawn_agent(node, options)
    }

    /// Starts a second agent on `node` while the first still runs, as a DaemonSet surge
    /// upgrade does; waits for the new one's `/readyz` (it has taken over by then). The first
    /// becomes the node's *previous* agent: signal it and wait for it with the
    /// `previous_agent` calls; the new one is the node's agent for every other call.
    pub fn start_successor_agent(&self, node: &str, options: &AgentOptions) -> Result<()> {
        self.retire_agent(node)?;
        self.spawn_agent(node, options)
    }

    /// Makes the running agent of `node` its previous agent (to be signalled and waited for
    /// with the `previous_agent` calls) so that a new one can be started while it drains.
    pub fn retire_agent(&self, node: &str) -> Result<()> {
        let mut res = lock(&self.shared);
        let running = res
            .agents
            .remove(node)
            .ok_or_else(|| self.agent_error(node, "no agent runs"))?;
        if let Some(mut older) = res.previous_agents.insert(node.to_owned(), running) {
            let _ = older.kill_and_reap();
        }
        Ok(())
    }

    /// Sends `signal` to the previous agent of `node` without waiting for it.
    pub fn signal_previous_agent(&self, node: &str, signal: Signal) -> Result<()> {
        let mut res = lock(&self.shared);
        let agent = res
            .previous_agents
            .get_mut(node)
            .ok_or_else(|| self.agent_error(node, "no previous agent"))?;
        agent
            .signal(signal)
            .io_context(|| format!("sending {signal} to the previous agent of {node}"))
    }

    /// Waits (at most `timeout`) for the previous agent of `node` to exit, and reaps it.
    pub fn wait_previous_agent(&self, node: &str, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut res = lock(&self.shared);
                let agent = res
                    .previous_agents
                    .get_mut(node)
                    .ok_or_else(|| self.agent_error(node, "no previous agent"))?;
                if let Some(status) = agent
                    .try_wait()
                    .io_context(|| format!("waiting for the previous agent of {node}"))?
                {
                    res.previous_agents.remove(node);
                    return Ok(status);
                }
            }
            if Instant::now() >= deadline {
                return Err(self.agent_error(
                    node,
                    &format!("the previous agent still runs after {timeout:?}"),
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn spawn_agent(&self, node: &str, options: &AgentOptions) -> Result<()> {
        let log_path = self.agent_log_path(node);
        std::fs::create_dir_all(&self.log_dir)
            .io_context(|| format!("creating {}", self.log_dir.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .io_context(|| format!("opening {}", log_path.display()))?;
        let mut process = match &options.container {
            None => self.spawn_agent_process(node, options, log),
            Some(container) => self.spawn_agent_container(node, container, log),
        }
        .map_err(|error| self.agent_error(node, &error.to_string()))?;
        tracing::info!(testbed = %self.name, node, pid = process.child.id(), "agent started");
        {
            let mut res = lock(&self.shared);
            if res.torn_down {
                let _ = process.kill_and_reap();
                return Err(self.agent_error(node, "the testbed was torn down"));
            }
            res.agents.insert(node.to_owned(), process);
        }
        if options.wait_ready {
            self.wait_agent_ready(node, options.ready_timeout)?;
        }
        Ok(())
    }

    /// The binary in the node's network namespace and `system` cgroup.
    fn spawn_agent_process(
        &self,
        node: &str,
        options: &AgentOptions,
        mut log: std::fs::File,
    ) -> Result<AgentProcess> {
        let netns = self.node(node)?.netns.clone();
        let args = self.agent_args(node, options)?;
        let binary = &self.config.nodemesh_bin;
        writeln!(
            log,
            "=== testbed {}: starting {} {}",
            self.name,
            binary.display(),
            args.join(" ")
        )
        .io_context(|| "writing the agent log".into())?;
        let stderr = log
            .try_clone()
            .io_context(|| "duplicating the agent log".into())?;
        let mut command = Command::new(binary);
        command
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        if self.control_plane.is_some() {
            command.env("KUBECONFIG", self.agent_kubeconfig(node)?);
        }
        let placement = Placement::new(&netns, &self.cgroup_root(node).join("system"))?;
        Ok(AgentProcess {
            child: placement.spawn(&mut command)?,
            container: None,
        })
    }

    /// The image's container as the DaemonSet's pod on `node` (the testbed's agent Pod of
    /// the node, its UID and cgroup), with the node's network namespace and paths.
    fn spawn_agent_container(
        &self,
        node: &str,
        container: &AgentContainer,
        mut log: std::fs::File,
    ) -> Result<AgentProcess> {
        if container.pod.host_network != Some(true) {
            return Err(TestbedError::Other(
                "the agent's pod template is not hostNetwork: the testbed has no pod network for it".into(),
            ));
        }
        let name = container
            .pod
            .containers
            .first()
            .map(|c| c.name.clone())
            .ok_or_else(|| {
                TestbedError::Other("the agent's pod template has no container".into())
            })?;
        let uid = self.agent_pod_uid(node)?.to_owned();
        let pod_name = api_cluster::agent_pod_name(node);
        let pod = KubeletPod {
            namespace: api_cluster::SYSTEM_NAMESPACE,
            name: &pod_name,
            uid: &uid,
            node,
            spec: &container.pod,
            netns: crate::netns::path(&self.node(node)?.netns),
            host_ip: self.node(node)?.ipv4().into(),
            pod_ip: self.node(node)?.ipv4().into(),
            cgroup: self.pod_cgroup(node, &container.pod, &uid)?,
            host_paths: self.node_host_paths(node),
            hosts: container.hosts.clone(),
        };
        writeln!(
            log,
            "=== testbed {}: starting {} as container {name} of pod {}/{pod_name}",
            self.name,
            container.image,
            api_cluster::SYSTEM_NAMESPACE
        )
        .io_context(|| "writing the agent log".into())?;
        let (mut command, files) = self.container_command(
            &container.runtime,
            &pod,
            &name,
            &container.image,
            &self.agent_log_path(node),
        )?;
        // ctr's own errors; the container's output goes to the log through the runtime.
        command.stdout(Stdio::null()).stderr(log);
        let child = command.spawn().io_context(|| "spawning ctr run".into())?;
        Ok(AgentProcess {
            child,
            container: Some(files),
        })
    }

    /// Waits until the agent of `node` answers 200 on `/readyz`; fails early if it exits.
    pub fn wait_agent_ready(&self, node: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.agent_exit_status(node) {
                return Err(self.agent_error(node, &format!("exited before ready: {status}")));
            }
            if !self.agent_running(node) {
                return Err(self.agent_error(node, "not running"));
            }
            let last = match self.admin_get_within(node, "/readyz", Duration::from_millis(500)) {
                // During an upgrade-style overlap two agents share the admin port: only the
                // one started here counts.
                Ok((200, body)) if self.answered_by_agent(node, &body) => return Ok(()),
                Ok((200, body)) => format!("/readyz answered by another agent: {}", body.trim()),
                Ok((status, body)) => format!("/readyz answered {status}: {}", body.trim()),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                let error = self.agent_error(
                    node,
                    &format!("not ready after {timeout:?} ({last}); killed it"),
                );
                let _ = self.kill_agent(node, Signal::SIGKILL);
                return Err(error);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether a `/readyz` body (`ready pid=N`) names the agent of `node` started here.
    fn answered_by_agent(&self, node: &str, body: &str) -> bool {
        let pid = body
            .trim()
            .strip_prefix("ready pid=")
            .and_then(|pid| pid.parse::<u32>().ok());
        pid.is_some() && pid == self.agent_pid(node)
    }

    /// Sends `signal` to the agent of `node` and reaps it (SIGKILL after 10 s if it lingers).
    pub fn kill_agent(&self, node: &str, signal: Signal) -> Result<ExitStatus> {
        let mut agent = lock(&self.shared)
            .agents
            .remove(node)
            .ok_or_else(|| self.agent_error(node, "no agent was started"))?;
        if signal == Signal::SIGKILL {
            agent
                .kill_and_reap()
                .io_context(|| format!("killing the agent of {node}"))?;
        } else {
            // ESRCH cannot happen (unreaped); anything else is worth reporting.
            agent
                .signal(signal)
                .io_context(|| format!("sending {signal} to the agent of {node}"))?;
            if agent.wait_or_kill(Duration::from_secs(10))? {
                tracing::warn!(node, %signal, "agent ignored the signal for 10 s; SIGKILLed it");
            }
        }
        let status = agent
            .child
            .wait()
            .io_context(|| format!("reaping the agent of {node}"))?;
        tracing::info!(testbed = %self.name, node, %status, "agent stopped");
        Ok(status)
    }

    /// Whether the agent of `node` is running (started and not exited).
    pub fn agent_running(&self, node: &str) -> bool {
        lock(&self.shared)
            .agents
            .get_mut(node)
            .is_some_and(|agent| matches!(agent.try_wait(), Ok(None)))
    }

    /// The exit status of the agent of `node` if it was started and has exited on its own.
    pub fn agent_exit_status(&self, node: &str) -> Option<ExitStatus> {
        lock(&self.shared)
            .agents
            .get_mut(node)
            .and_then(|agent| agent.try_wait().ok().flatten())
    }

    /// The container the agent of `node` runs in, if it runs from the image (for
    /// `Containerd::exec`, as `kubectl exec` into the DaemonSet's pod).
    pub fn agent_container_id(&self, node: &str) -> Option<String> {
        lock(&self.shared)
            .agents
            .get(node)
            .and_then(|agent| agent.container.as_ref().map(|c| c.id.clone()))
    }

    /// The pid of the agent of `node`, if one was started.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        lock(&self.shared)
            .agents
            .get(node)
            .and_then(AgentProcess::pid)
    }

    /// Resident memory of the agent of `node` (VmRSS), in KiB.
    pub fn agent_rss_kib(&self, node: &str) -> Result<u64> {
        let pid = self
            .agent_pid(node)
            .ok_or_else(|| self.agent_error(node, "no agent was started"))?;
        crate::util::rss_kib(pid).map_err(|error| self.agent_error(node, &error.to_string()))
    }

    /// Everything the agent of `node` has logged (across restarts).
    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read(self.agent_log_path(node))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// GETs `path` from the agent's admin API of `node`; returns (status, body).
    pub fn admin_get(&self, node: &str, path: &str) -> Result<(u16, String)> {
        self.admin_get_within(node, path, Duration::from_secs(5))
    }

    fn admin_get_within(&self, node: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
        let netns = self.node(node)?.netns.clone();
        http::get_in_netns(&netns, ADMIN_ADDR, path, timeout).map_err(|error| TestbedError::Admin {
            node: node.to_owned(),
            path: path.to_owned(),
            reason: error.to_string(),
        })
    }

    /// GETs `path` from the admin API of `node` and parses the 200 answer as JSON.
    pub fn admin_json(&self, node: &str, path: &str) -> Result<serde_json::Value> {
        let admin_error = |reason: String| TestbedError::Admin {
            node: node.to_owned(),
            path: path.to_owned(),
            reason,
        };
        let (status, body) = self.admin_get(node, path)?;
        if status != 200 {
            return Err(admin_error(format!("status {status}: {}", body.trim())));
        }
        serde_json::from_str(&body)
            .map_err(|error| admin_error(format!("bad JSON ({error}): {body}")))
    }

    /// The Services a `/config_dump` lists that a test made: without those every cluster on
    /// a real API server has, the API server's own `default/kubernetes` and the chart's
    /// `nodemesh-system/nodemesh-ca`.
    pub fn workload_services(dump: &serde_json::Value) -> Vec<&serde_json::Value> {
        const INSTALLED: [&str; 2] = ["default/kubernetes", "nodemesh-system/nodemesh-ca"];
        dump["services"]
            .as_array()
            .map(|services| {
                services
                    .iter()
                    .filter(|s| !INSTALLED.iter().any(|name| s["service"] == *name))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (15 s at most) until `/config_dump` of the pod's node lists the pod's UID, or no longer does.
    pub fn wait_pod_enrolled(&self, pod: &Pod, enrolled: bool) -> Result<()> {
        let what = format!(
            "{} to be {} on {}",
            pod.key(),
            if enrolled { "enrolled" } else { "unenrolled" },
            pod.node()
        );
        wait_until(Duration::from_secs(15), &what, || {
            let dump = self.admin_json(pod.node(), "/config_dump")?;
            let listed = dump["enrolled_pods"]
                .as_array()
                .is_some_and(|pods| pods.iter().any(|p| p["uid"].as_str() == Some(pod.uid())));
            Ok(listed == enrolled)
        })
    }

    fn agent_error(&self, node: &str, reason: &str) -> TestbedError {
        let log = self.agent_log_path(node);
        TestbedError::Agent {
            node: node.to_owned(),
            reason: reason.to_owned(),
            log_tail: tail(&log, LOG_TAIL_LINES),
            log,
        }
    }
}
