//! Programs running inside pods: the process handle, running to completion, listening checks.

use std::{
    io::Read,
    process::{Child, ExitStatus, Output},
    sync::Weak,
    thread,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cleanup::{Resources, Tracked, kill_and_reap, lock},
    error::{IoContext, Result, TestbedError},
    exec::wait_or_kill,
};

/// A process running in a pod. Dropping the handle SIGKILLs and reaps the process.
#[must_use = "dropping a PodProcess (also via `let _ =`) kills the process: keep it in a variable or call .detach() to leave it running until teardown"]
#[derive(Debug)]
pub struct PodProcess {
    child: Option<Child>,
    pid: u32,
    pod: String,
    program: String,
    owner: Weak<std::sync::Mutex<Resources>>,
}

impl PodProcess {
    pub(crate) fn new(
        child: Child,
        pod: String,
        program: String,
        owner: Weak<std::sync::Mutex<Resources>>,
    ) -> Self {
        Self {
            pid: child.id(),
            child: Some(child),
            pod,
            program,
            owner,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `<namespace>/<name>` of the pod it runs in.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// The underlying child (e.g. to take its piped stdout).
    pub fn child_mut(&mut self) -> &mut Child {
        // Invariant: `child` is Some until a consuming method or Drop takes it.
        self.child.as_mut().expect("PodProcess child present")
    }

    /// Whether it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let pid = self.pid;
        self.child_mut()
            .try_wait()
            .io_context(|| format!("checking pid {pid}"))
    }

    /// Sends a signal (the process is not reaped; `wait` or drop does that).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        kill(pid, signal).io_context(|| format!("sending {signal} to {}", self.program))
    }

    /// Waits (at most `timeout`, then SIGKILL) for it to exit; returns its status.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.take_child();
        let timed_out = wait_or_kill(&mut child, timeout)?;
        let status = child
            .wait()
            .io_context(|| format!("reaping {}", self.program))?;
        if timed_out {
            return Err(TestbedError::Timeout {
                what: format!("{} in {} to exit", self.program, self.pod),
                timeout,
                last_error: None,
            });
        }
        Ok(status)
    }

    /// Waits (at most `timeout`) and collects piped stdout/stderr (set `Stdio::piped()` first).
    pub fn wait_with_output(mut self, timeout: Duration) -> Result<Output> {
        let child = self.take_child();
        collect_output(child, &self.program, &self.pod, timeout)
    }

    /// SIGKILLs and reaps it now; returns its status.
    pub fn kill(mut self) -> Result<ExitStatus> {
        let mut child = self.take_child();
        kill_and_reap(&mut child).io_context(|| format!("killing {}", self.program))?;
        child
            .wait()
            .io_context(|| format!("reaping {}", self.program))
    }

    /// Leaves the process running; the testbed kills and reaps it at teardown.
    pub fn detach(mut self) {
        let child = self.take_child();
        match self.owner.upgrade() {
            Some(owner) => {
                let mut res = lock(&owner);
                if res.torn_down {
                    drop(res);
                    let mut child = child;
                    let _ = kill_and_reap(&mut child);
                } else {
                    res.children.push(Tracked {
                        what: format!("{} in {}", self.program, self.pod),
                        pod: Some(self.pod.clone()),
                        child,
                    });
                }
            }
            None => {
                let mut child = child;
                let _ = kill_and_reap(&mut child);
            }
        }
    }

    fn take_child(&mut self) -> Child {
        // Invariant: only consuming methods call this, once.
        self.child.take().expect("PodProcess child present")
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(error) = kill_and_reap(&mut child)
        {
            tracing::warn!(pid = self.pid, %error, "killing a pod process on drop");
        }
    }
}

/// Reads a child's piped stdout and stderr while waiting for it (at most `timeout`).
pub(crate) fn collect_output(
    mut child: Child,
    program: &str,
    pod: &str,
    timeout: Duration,
) -> Result<Output> {
    let readers: Vec<thread::JoinHandle<Vec<u8>>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|pipe| {
        thread::spawn(move || {
            let mut buffer = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buffer);
            }
            buffer
        })
    })
    .collect();
    let timed_out = wait_or_kill(&mut child, timeout)?;
    let status = child.wait().io_context(|| format!("reaping {program}"))?;
    let mut outputs = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let stdout = outputs.next().unwrap_or_default();
    let stderr = outputs.next().unwrap_or_default();
    if timed_out {
        return Err(TestbedError::Timeout {
            what: format!("{program} in {pod} to finish"),
            timeout,
            last_error: Some(format!(
                "stdout: {} stderr: {}",
                String::from_utf8_lossy(&stdout).trim(),
                String::from_utf8_lossy(&stderr).trim()
            )),
        });
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Whether a TCP socket is listening on `port` in the network namespace of process `pid`.
pub(crate) fn is_listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|table| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .map(|text| listening_in_table(&text, port))
            .unwrap_or(false)
    })
}

/// Parses a /proc/net/tcp{,6} table: `sl local_address rem_address st ...`, LISTEN is 0A.
fn listening_in_table(text: &str, port: u16) -> bool {
    text.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        let local_port = local
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && state == Some("0A")
    })
}

/// How long `run_in_pod` lets a program run.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);

impl crate::Testbed {
    /// Starts `command` inside the pod (its netns and app container cgroup); the handle kills on drop.
    pub fn spawn_in_pod(
        &self,
        pod: &crate::Pod,
        mut command: std::process::Command,
    ) -> Result<PodProcess> {
        let program = command.get_program().to_string_lossy().into_owned();
        let child = crate::exec::Placement::new(pod.netns(), &pod.cgroup())?.spawn(&mut command)?;
        tracing::debug!(pod = %pod.key(), pid = child.id(), %program, "spawned in pod");
        Ok(PodProcess::new(
            child,
            pod.key(),
            program,
            self.shared_weak(),
        ))
    }

    /// Runs `command` inside the pod to completion (120 s at most), capturing stdout and stderr.
    pub fn run_in_pod(&self, pod: &crate::Pod, command: std::process::Command) -> Result<Output> {
        self.run_in_pod_timeout(pod, command, DEFAULT_RUN_TIMEOUT)
    }

    /// Like `run_in_pod`, killing the program after `timeout` (which is then an error).
    pub fn run_in_pod_timeout(
        &self,
        pod: &crate::Pod,
        mut command: std::process::Command,
        timeout: Duration,
    ) -> Result<Output> {
        use std::process::Stdio;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = self.spawn_in_pod(pod, command)?;
        let child = process.take_child();
        collect_output(child, &process.program, &process.pod, timeout)
    }

    /// A connection through the mesh that the test itself holds: a socat relay in `pod` (so
    /// the connection is the pod's, and captured) from `relay_port` on the pod's loopback to
    /// `target`, and the test's connection to that relay. Reads time out after 10 s.
    pub fn hold_connection(
        &self,
        pod: &crate::Pod,
        relay_port: u16,
        target: std::net::SocketAddr,
    ) -> Result<std::net::TcpStream> {
        let mut socat = std::process::Command::new("socat");
        socat.args([
            format!("TCP-LISTEN:{relay_port},bind=127.0.0.1,reuseaddr"),
            format!("TCP:{target}"),
        ]);
        self.spawn_in_pod(pod, socat)?.detach();
        self.wait_listening(pod, relay_port)?;
        let relay = std::net::SocketAddr::from(([127, 0, 0, 1], relay_port));
        let stream = self.connect_from_pod(pod, relay)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .io_context(|| "setting a read timeout".to_owned())?;
        Ok(stream)
    }

    /// Waits (10 s at most) until something in the pod listens on TCP `port`.
    pub fn wait_listening(&self, pod: &crate::Pod, port: u16) -> Result<()> {
        self.wait_listening_within(pod, port, Duration::from_secs(10))
    }

    /// Waits (at most `timeout`) until something in the pod listens on TCP `port`.
    pub fn wait_listening_within(
        &self,
        pod: &crate::Pod,
        port: u16,
        timeout: Duration,
    ) -> Result<()> {
        let pid = pod.sandbox_pid();
        crate::wait_until(
            timeout,
            &format!("a listener on port {port} in {}", pod.key()),
            || Ok(is_listening(pid, port)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listeners() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert!(listening_in_table(table, 7000));
        assert!(!listening_in_table(table, 8080));
        assert!(!listening_in_table(table, 7001));
    }
}
