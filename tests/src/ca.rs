//! The nodemesh CA as a pod of the testbed, the way its Deployment runs in a cluster: agents
//! reach it at the pod's address, each with a token of its own node.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    Pod, Testbed, api_cluster,
    containerd::{Containerd, RunFiles},
    error::{IoContext, Result, TestbedError},
    kubelet::KubeletPod,
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
    /// Set when the CA runs from the image (`start_ca_container`).
    container: Option<CaContainer>,
    /// The running container, when it runs from the image.
    running: Option<RunFiles>,
}

/// The CA as the chart's Deployment runs it: its pod template, the image, the runtime.
#[derive(Clone, Debug)]
pub struct CaContainer {
    /// The testbed's containerd, with the image imported.
    pub runtime: Containerd,
    /// The image reference to run (the Deployment's, as installed).
    pub image: String,
    /// The Deployment's pod template spec (`ChartPods::ca`).
    pub pod: k8s_openapi::api::core::v1::PodSpec,
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
        self.agent_args_with_token_file(&self.token_file(token_node))
    }

    /// Agent arguments presenting the token in `token_file` to the CA.
    pub fn agent_args_with_token_file(&self, token_file: &Path) -> Vec<String> {
        vec![
            "--ca-addr".into(),
            self.addr.to_string(),
            "--ca-token-file".into(),
            token_file.display().to_string(),
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
        if let Some(mut process) = self.process.take() {
            // A container's client (`ctr run`) does not take the container along on SIGKILL.
            if let Some(pid) = self.running.take().and_then(|running| running.pid())
                && process.try_wait()?.is_none()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            process.kill()?;
        }
        Ok(())
    }

    /// The pid of the CA process while it runs as a binary in its pod (not from the image).
    pub fn pid(&self) -> Option<u32> {
        match self.container {
            Some(_) => None,
            None => self.process.as_ref().map(PodProcess::pid),
        }
    }

    /// The CA's container id and pid while it runs from the image.
    pub fn container(&self) -> Option<(String, Option<u32>)> {
        let running = self.running.as_ref()?;
        Some((running.id.clone(), running.pid()))
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
        let port_arg = port.to_string();
        let args = ["http-server", "--port", &port_arg, "--name", pod.name()];
        self.start_workload_server(pod, port, &args)
    }

    /// Starts the workload's echo server on `port` in `pod` and waits until it listens.
    pub fn start_echo_server(&self, pod: &crate::Pod, port: u16) -> Result<()> {
        let args = ["echo-server", "--ports", &port.to_string()];
        self.start_workload_server(pod, port, &args)
    }

    /// Runs `nodemesh-workload <args>` in `pod`, left running, and waits until it listens on
    /// `port`.
    pub fn start_workload_server(&self, pod: &crate::Pod, port: u16, args: &[&str]) -> Result<()> {
        let mut server = std::process::Command::new(self.workload_bin());
        server.args(args);
        self.spawn_in_pod(pod, server)?.detach();
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
        let dir = self.ca_init()?;
        let path = dir.path();
        match &self.control_plane {
            Some(api) => {
                // Each agent's projected token for the CA: audience nodemesh, bound to the
                // node's agent Pod; the CA's own, bound to its pod, reaches the API server.
                for node in self.nodes() {
                    api.project_token(
                        api_cluster::SYSTEM_NAMESPACE,
                        api_cluster::AGENT_SERVICE_ACCOUNT,
                        (
                            &api_cluster::agent_pod_name(node.name()),
                            self.agent_pod_uid(node.name())?,
                        ),
                        &[api_cluster::CA_AUDIENCE],
                        &path.join(format!("token-{}", node.name())),
                    )?;
                }
                let token = api.project_token(
                    pod.namespace(),
                    pod.service_account(),
                    (pod.name(), pod.uid()),
                    &[],
                    &path.join("api-token"),
                )?;
                let kubeconfig = api.write_kubeconfig(&format!("ca-{}", pod.name()), &token)?;
                std::fs::copy(&kubeconfig, path.join("kubeconfig"))
                    .io_context(|| "copying the CA's kubeconfig".into())?;
            }
            None => {
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
            }
        }
        let mut ca = MeshCa {
            dir,
            addr: SocketAddr::new(pod.ipv4().into(), CA_PORT),
            pod: pod.clone(),
            cert_ttl_seconds,
            process: None,
            container: None,
            running: None,
        };
        self.restart_ca(&mut ca)?;
        Ok(ca)
    }

    /// `nodemesh ca init` (root and issuer) in a new directory, as an operator runs it
    /// offline.
    fn ca_init(&self) -> Result<tempfile::TempDir> {
        let dir = tempfile::tempdir().io_context(|| "creating the CA directory".into())?;
        let init = Command::new(self.nodemesh_bin())
            .args(["ca", "init", "--dir"])
            .arg(dir.path())
            .output()
            .io_context(|| "running nodemesh ca init".into())?;
        if !init.status.success() {
            return Err(TestbedError::Command {
                command: "nodemesh ca init".into(),
                status: init.status.to_string(),
                stderr: String::from_utf8_lossy(&init.stderr).into_owned(),
            });
        }
        Ok(dir)
    }

    /// The CA from the image in `pod`, as the chart's Deployment runs it: a root and
    /// issuer from `nodemesh ca init`, the issuer Secret and the trust-bundle ConfigMap
    /// created with the commands of deploy/README.md, then the container with the pod
    /// template's args, user, volumes and security context. Returns once it listens.
    pub fn start_ca_container(&self, pod: &Pod, container: CaContainer) -> Result<MeshCa> {
        let dir = self.ca_init()?;
        self.publish_ca_objects(dir.path())?;
        let mut ca = MeshCa {
            dir,
            addr: SocketAddr::new(pod.ipv4().into(), CA_PORT),
            pod: pod.clone(),
            cert_ttl_seconds: 0,
            process: None,
            container: Some(container),
            running: None,
        };
        self.restart_ca(&mut ca)?;
        Ok(ca)
    }

    /// Puts the CA's material from `dir` where the chart keeps it: the issuer Secret
    /// `nodemesh-issuer` and the trust bundle ConfigMap `nodemesh-trust-bundle` (applied, so
    /// a second call changes nothing).
    pub fn publish_ca_objects(&self, dir: &Path) -> Result<()> {
        let file = |name: &str| dir.join(name).display().to_string();
        let api = self.api()?;
        let namespace = api_cluster::SYSTEM_NAMESPACE;
        let issuer_cert = format!("--from-file=issuer-cert.pem={}", file("issuer-cert.pem"));
        let issuer_key = format!("--from-file=issuer-key.pem={}", file("issuer-key.pem"));
        let bundle = format!("--from-file=trust-bundle.pem={}", file("trust-bundle.pem"));
        let objects: [(&str, Vec<&str>); 2] = [
            (
                "issuer",
                vec![
                    "secret",
                    "generic",
                    "nodemesh-issuer",
                    &issuer_cert,
                    &issuer_key,
                ],
            ),
            (
                "trust-bundle",
                vec!["configmap", "nodemesh-trust-bundle", &bundle],
            ),
        ];
        for (name, create) in objects {
            let mut args = vec!["-n", namespace, "create"];
            args.extend(create);
            args.extend(["--dry-run=client", "-o", "yaml"]);
            let yaml = api.kubectl_ok(&args)?;
            let path = self.log_dir().join(format!("ca-{name}.yaml"));
            std::fs::write(&path, yaml).io_context(|| format!("writing {}", path.display()))?;
            api.kubectl_ok(&["apply", "-f", &path.display().to_string()])?;
        }
        Ok(())
    }

    /// Starts `ca` again after `MeshCa::stop` (same root, issuer and tokens); returns once it
    /// listens.
    pub fn restart_ca(&self, ca: &mut MeshCa) -> Result<()> {
        ca.stop()?;
        if let Some(container) = ca.container.clone() {
            return self.run_ca_container(ca, &container);
        }
        let path = ca.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.join("ca.log"))
            .io_context(|| "opening ca.log".into())?;
        let mut serve = Command::new(self.nodemesh_bin());
        serve
            .args(["ca", "serve", "--listen", &format!("0.0.0.0:{CA_PORT}")])
            .args(["--log-format", "text"])
            .arg("--issuer-cert")
            .arg(path.join("issuer-cert.pem"))
            .arg("--issuer-key")
            .arg(path.join("issuer-key.pem"))
            .args(["--cert-ttl-seconds", &ca.cert_ttl_seconds.to_string()])
            .stderr(log);
        if self.control_plane.is_some() {
            // TokenReview and pod lookups in the API server, under the chart's CA RBAC.
            // The MeshNode sweep every second: agents in tests write every second too.
            serve
                .arg("--kubernetes")
                .args(["--mesh-node-sweep-seconds", "1"])
                .env("KUBECONFIG", path.join("kubeconfig"));
        } else {
            serve
                .arg("--token-file")
                .arg(path.join("tokens"))
                .arg("--cluster-state")
                .arg(self.cluster_state_dir());
        }
        ca.process = Some(self.spawn_in_pod(&ca.pod, serve)?);
        self.wait_listening(&ca.pod, CA_PORT)
    }

    /// The CA's container in its pod (the pod's network namespace and cgroup), its output
    /// in `ca.log`.
    fn run_ca_container(&self, ca: &mut MeshCa, container: &CaContainer) -> Result<()> {
        let name = container
            .pod
            .containers
            .first()
            .map(|c| c.name.clone())
            .ok_or_else(|| TestbedError::Other("the CA's pod template has no container".into()))?;
        let pod = KubeletPod {
            namespace: ca.pod.namespace(),
            name: ca.pod.name(),
            uid: ca.pod.uid(),
            node: ca.pod.node(),
            spec: &container.pod,
            netns: crate::netns::path(ca.pod.netns()),
            host_ip: self.node(ca.pod.node())?.ipv4().into(),
            pod_ip: ca.pod.ipv4().into(),
            cgroup: ca.pod.pod_cgroup.clone(),
            host_paths: Default::default(),
            hosts: Vec::new(),
        };
        let (mut command, running) = self.container_command(
            &container.runtime,
            &pod,
            &name,
            &container.image,
            &ca.dir().join("ca.log"),
        )?;
        command.stdout(std::process::Stdio::null());
        let child = command.spawn().io_context(|| "spawning ctr run".into())?;
        ca.running = Some(running);
        ca.process = Some(PodProcess::new(
            child,
            ca.pod.key(),
            format!("{} (ctr run)", container.image),
            self.shared_weak(),
        ));
        self.wait_listening(&ca.pod, CA_PORT)
    }
}
