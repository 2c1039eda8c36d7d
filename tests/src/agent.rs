//! The nodemesh agent of each node: starting it in the node, stopping it, its admin API.

use std::{
    fs::OpenOptions,
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    Pod, Testbed,
    cleanup::{kill_and_reap, lock},
    error::{IoContext, Result, TestbedError},
    exec::{Placement, wait_or_kill},
    http,
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
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            fail_mode: "open".to_owned(),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            wait_ready: true,
        }
    }
}

impl Testbed {
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
            "--cluster-state".to_owned(),
            self.cluster_state_dir.display().to_string(),
            "--cgroup-root".to_owned(),
            self.cgroup_root(node).display().to_string(),
            "--bpffs".to_owned(),
            self.bpffs_dir(node).display().to_string(),
            "--fail-mode".to_owned(),
            options.fail_mode.clone(),
            "--admin-addr".to_owned(),
            ADMIN_ADDR.to_string(),
        ];
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
            let _ = kill_and_reap(&mut older);
        }
        Ok(())
    }

    /// Sends `signal` to the previous agent of `node` without waiting for it.
    pub fn signal_previous_agent(&self, node: &str, signal: Signal) -> Result<()> {
        let res = lock(&self.shared);
        let agent = res
            .previous_agents
            .get(node)
            .ok_or_else(|| self.agent_error(node, "no previous agent"))?;
        let pid = Pid::from_raw(i32::try_from(agent.id()).unwrap_or(i32::MAX));
        kill(pid, signal).io_context(|| format!("sending {signal} to the previous agent of {node}"))
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
        let netns = self.node(node)?.netns.clone();
        let args = self.agent_args(node, options)?;
        let log_path = self.agent_log_path(node);
        std::fs::create_dir_all(&self.log_dir)
            .io_context(|| format!("creating {}", self.log_dir.display()))?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .io_context(|| format!("opening {}", log_path.display()))?;
        let binary = &self.config.nodemesh_bin;
        writeln!(
            log,
            "=== testbed {}: starting {} {}",
            self.name,
            binary.display(),
            args.join(" ")
        )
        .io_context(|| format!("writing {}", log_path.display()))?;
        let stderr = log
            .try_clone()
            .io_context(|| format!("duplicating {}", log_path.display()))?;
        let mut command = Command::new(binary);
        command
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // The log is a file for people to read: no colour escapes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let placement = Placement::new(&netns, &self.cgroup_root(node).join("system"))?;
        let child = placement
            .spawn(&mut command)
            .map_err(|error| self.agent_error(node, &error.to_string()))?;
        tracing::info!(testbed = %self.name, node, pid = child.id(), "agent started");
        {
            let mut res = lock(&self.shared);
            if res.torn_down {
                let mut child = child;
                let _ = kill_and_reap(&mut child);
                return Err(self.agent_error(node, "the testbed was torn down"));
            }
            res.agents.insert(node.to_owned(), child);
        }
        if options.wait_ready {
            self.wait_agent_ready(node, options.ready_timeout)?;
        }
        Ok(())
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
        let mut child = lock(&self.shared)
            .agents
            .remove(node)
            .ok_or_else(|| self.agent_error(node, "no agent was started"))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        if signal == Signal::SIGKILL {
            kill_and_reap(&mut child).io_context(|| format!("killing the agent of {node}"))?;
        } else {
            // ESRCH cannot happen (unreaped); anything else is worth reporting.
            kill(pid, signal).io_context(|| format!("sending {signal} to the agent of {node}"))?;
            if wait_or_kill(&mut child, Duration::from_secs(10))? {
                tracing::warn!(node, %signal, "agent ignored the signal for 10 s; SIGKILLed it");
            }
        }
        let status = child
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

    /// The pid of the agent of `node`, if one was started.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        lock(&self.shared).agents.get(node).map(|a| a.id())
    }

    /// Resident memory of the agent of `node` (VmRSS), in KiB.
    pub fn agent_rss_kib(&self, node: &str) -> Result<u64> {
        let pid = self
            .agent_pid(node)
            .ok_or_else(|| self.agent_error(node, "no agent was started"))?;
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).io_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| self.agent_error(node, &format!("no VmRSS in {path}")))
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
