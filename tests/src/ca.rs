//! The nodemesh CA as a pod of the testbed, the way its Deployment runs in a cluster: agents
//! reach it at the pod's address, each with a token of its own node.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    Pod, Testbed,
    error::{IoContext, Result, TestbedError},
    workload::PodProcess,
};

/// Port the CA listens on.
pub const CA_PORT: u16 = 15012;

/// A running CA and the files agents need to talk to it (removed on drop, and the CA
/// stopped).
pub struct MeshCa {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    pod: Pod,
    cert_ttl_seconds: u64,
    process: Option<PodProcess>,
}

impl MeshCa {
    /// Where the CA listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Directory with the root, issuer, trust bundle, tokens and `ca.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The trust bundle agents verify the CA and each other with.
    pub fn trust_bundle(&self) -> PathBuf {
        self.dir().join("trust-bundle.pem")
    }

    /// The file holding `node`'s token.
    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir().join(format!("token-{node}"))
    }

    /// Agent arguments that make `node`'s agent use this CA with its own token.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        self.agent_args_with_token_of(node)
    }

    /// Agent arguments using the token of `token_node` (to test what the CA refuses).
    pub fn agent_args_with_token_of(&self, token_node: &str) -> Vec<String> {
        vec![
            "--ca-addr".into(),
            self.addr.to_string(),
            "--ca-token-file".into(),
            self.token_file(token_node).display().to_string(),
            "--trust-bundle".into(),
            self.trust_bundle().display().to_string(),
        ]
    }

    /// What the CA logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("ca.log")).unwrap_or_default()
    }

    /// Stops the CA (an outage); `Testbed::restart_ca` brings the same CA back.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }
}

impl Testbed {
    /// The standard testbed with the CA running as a pod (issuing certificates valid for
    /// `cert_ttl_seconds`) and every node's agent started with it: the mesh as users run it.
    pub fn create_meshed(prefix: &str, cert_ttl_seconds: u64) -> Result<(Testbed, MeshCa)> {
        let config = crate::TestbedConfig::from_workspace(prefix)?;
        let tb = Testbed::create(config, crate::TopologySpec::standard_with_ca())?;
        let ca_pod = tb.pod("nodemesh-system", "ca").clone();
        let ca = tb.start_ca(&ca_pod, cert_ttl_seconds)?;
        tb.start_agents_with_ca(&ca)?;
        Ok((tb, ca))
    }

    /// Starts the workload's HTTP server on `port` in `pod` and waits until it listens.
    pub fn start_http_server(&self, pod: &crate::Pod, port: u16) -> Result<()> {
        let mut http = std::process::Command::new(self.workload_bin());
        http.args([
            "http-server",
            "--port",
            &port.to_string(),
            "--name",
            pod.name(),
        ]);
        self.spawn_in_pod(pod, http)?.detach();
        self.wait_listening(pod, port)
    }

    /// Starts the workload's echo server on `port` in `pod` and waits until it listens.
    pub fn start_echo_server(&self, pod: &crate::Pod, port: u16) -> Result<()> {
        let mut echo = std::process::Command::new(self.workload_bin());
        echo.args(["echo-server", "--ports", &port.to_string()]);
        self.spawn_in_pod(pod, echo)?.detach();
        self.wait_listening(pod, port)
    }

    /// Starts every node's agent using `ca` with the node's own token; returns once each is
    /// ready (which includes holding its pods' certificates).
    pub fn start_agents_with_ca(&self, ca: &MeshCa) -> Result<()> {
        for node in self
            .nodes()
            .iter()
            .map(|n| n.name().to_owned())
            .collect::<Vec<_>>()
        {
            let options = crate::AgentOptions {
                extra_args: ca.agent_args(&node),
                ..Default::default()
            };
            self.start_agent(&node, &options)?;
        }
        Ok(())
    }

    /// Creates a root and issuer, a token per node, and runs `nodemesh ca serve` in `pod`,
    /// issuing certificates valid for `cert_ttl_seconds`; returns once it listens.
    pub fn start_ca(&self, pod: &Pod, cert_ttl_seconds: u64) -> Result<MeshCa> {
        let dir = tempfile::tempdir().io_context(|| "creating the CA directory".into())?;
        let path = dir.path();
        let init = Command::new(self.nodemesh_bin())
            .args(["ca", "init", "--dir"])
            .arg(path)
            .output()
            .io_context(|| "running nodemesh ca init".into())?;
        if !init.status.success() {
            return Err(TestbedError::Command {
                command: "nodemesh ca init".into(),
                status: init.status.to_string(),
                stderr: String::from_utf8_lossy(&init.stderr).into_owned(),
            });
        }
        let mut tokens = String::new();
        for node in self.nodes() {
            let token = format!("token-{}-{}", self.name(), node.name());
            tokens.push_str(&format!("{token} {}\n", node.name()));
            std::fs::write(
                path.join(format!("token-{}", node.name())),
                format!("{token}\n"),
            )
            .io_context(|| "writing a token".into())?;
        }
        std::fs::write(path.join("tokens"), tokens)
            .io_context(|| "writing the token file".into())?;
        let mut ca = MeshCa {
            dir,
            addr: SocketAddr::new(pod.ipv4().into(), CA_PORT),
            pod: pod.clone(),
            cert_ttl_seconds,
            process: None,
        };
        self.restart_ca(&mut ca)?;
        Ok(ca)
    }

    /// Starts `ca` again after `MeshCa::stop` (same root, issuer and tokens); returns once it
    /// listens.
    pub fn restart_ca(&self, ca: &mut MeshCa) -> Result<()> {
        ca.stop()?;
        let path = ca.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.join("ca.log"))
            .io_context(|| "opening ca.log".into())?;
        let mut serve = Command::new(self.nodemesh_bin());
        serve
            .args(["ca", "serve", "--listen", &format!("0.0.0.0:{CA_PORT}")])
            .arg("--issuer-cert")
            .arg(path.join("issuer-cert.pem"))
            .arg("--issuer-key")
            .arg(path.join("issuer-key.pem"))
            .arg("--token-file")
            .arg(path.join("tokens"))
            .arg("--cluster-state")
            .arg(self.cluster_state_dir())
            .args(["--cert-ttl-seconds", &ca.cert_ttl_seconds.to_string()])
            .stderr(log);
        ca.process = Some(self.spawn_in_pod(&ca.pod, serve)?);
        self.wait_listening(&ca.pod, CA_PORT)
    }
}
