//! The container image, run the way the chart runs it: `cargo xtask image` builds the OCI
//! archive, a private containerd (Debian's, with runc) imports it as a node's operator
//! would, and the testbed plays the kubelet for the chart's own pod templates, read from
//! deploy/manifests/nodemesh.yaml: the agents of both nodes with the DaemonSet's host
//! network and PID namespaces, exactly its capabilities, its mounts (the nodes' bpffs,
//! cgroup and /run/nodemesh directories for its hostPaths), its read-only root filesystem,
//! its args (`$(HOST_IP)` expanded as the kubelet does) and containerd's default seccomp
//! profile for its capabilities; the CA with the Deployment's non-root user, fsGroup and
//! seccomp profile. The chart is installed
//! with the values file the image build wrote, so the containers run the image by digest.
//! Then meshed traffic crosses the nodes over HBONE. Needs root.

use std::{
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::core::v1::PodSpec;
use nodemesh_testbed::{
    AgentContainer, AgentOptions, CaContainer, ChartPods, ClusterMode, Containerd, ImageArchive,
    MeshCa, Testbed, TestbedConfig, TopologySpec, is_root, wait_until,
};
use serde_json::Value;

/// The CA Service's name in the agent's `--ca-addr`, resolved through `/etc/hosts` here.
const CA_SERVICE: &str = "nodemesh-ca.nodemesh-system.svc";

/// The capabilities' bits in `/proc/<pid>/status` (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The root mount of `pid`'s mount namespace is read-only.
fn root_read_only(pid: u32) -> bool {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(4) == Some(&"/")
            && fields
                .get(5)
                .is_some_and(|o| o.split(',').any(|o| o == "ro"))
    })
}

/// The image the installed chart's `kind`/`name` names (helm installed it with the image
/// values).
fn installed_image(tb: &Testbed, kind: &str, name: &str) -> String {
    let object = tb
        .api()
        .expect("API server")
        .get(&serde_json::json!({"apiVersion": "apps/v1", "kind": kind,
            "metadata": {"name": name, "namespace": "nodemesh-system"}}))
        .expect("read the installed workload")
        .expect("installed");
    object.data["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("an image")
        .to_owned()
}

fn agent_options(runtime: &Containerd, image: &str, pod: PodSpec, ca: &MeshCa) -> AgentOptions {
    AgentOptions {
        container: Some(AgentContainer {
            runtime: runtime.clone(),
            image: image.to_owned(),
            pod,
            hosts: vec![(CA_SERVICE.to_owned(), ca.addr().ip())],
        }),
        ready_timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

/// The pod template without one of the agent container's capabilities, or without one of
/// its volume mounts: what the test must notice if the agent needed more than the manifest.
fn agent_without(pod: &PodSpec, capability: Option<&str>, mount: Option<&str>) -> PodSpec {
    let mut pod = pod.clone();
    let container = &mut pod.containers[0];
    if let Some(capability) = capability {
        let added = container
            .security_context
            .as_mut()
            .and_then(|c| c.capabilities.as_mut())
            .and_then(|c| c.add.as_mut())
            .expect("the agent adds capabilities");
        added.retain(|c| c != capability);
    }
    if let Some(mount) = mount {
        container
            .volume_mounts
            .as_mut()
            .expect("volume mounts")
            .retain(|m| m.name != mount);
    }
    pod
}

#[test]
fn the_image_runs_the_mesh_as_the_chart_deploys_it() {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let scratch = tempfile::tempdir().expect("scratch directory");
    let image = ImageArchive::build(scratch.path()).expect("cargo xtask image");
    let mut config = TestbedConfig::from_workspace("nmimg")
        .expect("config")
        .with_cluster(ClusterMode::ApiServer);
    config.chart_values = vec![image.values.clone()];
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");

    // Imported as docs/install.md imports it on a node.
    let runtime = tb.start_containerd().expect("containerd");
    let names = runtime
        .import(&image.archive, &image.repository)
        .expect("ctr images import");
    let pinned = image.pinned_reference();
    assert!(
        names.contains(&format!("{}:{}", image.repository, image.tag)) && names.contains(&pinned),
        "the tag and the digest name the image: {names:?}"
    );
    // The chart installed with the image values names the image by digest.
    let agent_image = installed_image(&tb, "DaemonSet", "nodemesh-agent");
    let ca_image = installed_image(&tb, "Deployment", "nodemesh-ca");
    assert_eq!(
        (agent_image.as_str(), ca_image.as_str()),
        (pinned.as_str(), pinned.as_str())
    );

    let chart = ChartPods::from_workspace().expect("deploy/manifests/nodemesh.yaml");
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb
        .start_ca_container(
            &ca_pod,
            CaContainer {
                runtime: runtime.clone(),
                image: ca_image,
                pod: chart.ca.clone(),
            },
        )
        .unwrap_or_else(|e| panic!("the CA container: {e}"));
    let (_, ca_pid) = ca.container().expect("the CA runs from the image");
    let ca_pid = ca_pid.expect("the CA container's pid");
    // The Deployment's securityContext, as the kernel sees the CA's process.
    assert_eq!(
        status_field(ca_pid, "Uid").split_whitespace().next(),
        Some("65532")
    );
    assert!(
        status_field(ca_pid, "Groups")
            .split_whitespace()
            .any(|g| g == "65532"),
        "the fsGroup, which the issuer's files belong to"
    );
    assert_eq!(status_field(ca_pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(ca_pid, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(ca_pid, "Seccomp"),
        "2",
        "RuntimeDefault: a filter"
    );
    assert!(root_read_only(ca_pid));

    // Controls first: without one of its capabilities or mounts, node1's agent cannot do
    // its job (it exits, or leaves client-a out of the mesh and says why), so the run below
    // needs no more than the manifest gives. (CAP_BPF alone is no control: CAP_SYS_ADMIN
    // also allows bpf().)
    let client = tb.pod("mesh", "client-a").clone();
    for (what, pod) in [
        (
            "CAP_SYS_ADMIN",
            agent_without(&chart.agent, Some("SYS_ADMIN"), None),
        ),
        (
            "CAP_NET_ADMIN",
            agent_without(&chart.agent, Some("NET_ADMIN"), None),
        ),
        (
            "the bpffs mount",
            agent_without(&chart.agent, None, Some("bpffs")),
        ),
    ] {
        let options = AgentOptions {
            wait_ready: false,
            ..agent_options(&runtime, &agent_image, pod, &ca)
        };
        tb.start_agent("node1", &options)
            .expect("agent container started");
        let mut failed = None;
        wait_until(
            Duration::from_secs(30),
            &format!("the agent without {what} to fail"),
            || {
                if !tb.agent_running("node1") {
                    failed = Some("it exited".to_owned());
                } else if let Ok(dump) = tb.admin_json("node1", "/config_dump") {
                    failed = dump["pending_pods"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["uid"] == client.uid())
                        .map(|p| format!("client-a not enrolled: {}", p["reason"]));
                }
                Ok(failed.is_some())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", tb.agent_log("node1")));
        let failed = failed.unwrap_or_default();
        eprintln!("without {what}: {failed}");
        if tb.agent_running("node1") {
            tb.kill_agent("node1", nodemesh_testbed::Signal::SIGKILL)
                .expect("stop the control");
        }
    }

    for node in ["node1", "node2"] {
        tb.start_agent(
            node,
            &agent_options(&runtime, &agent_image, chart.agent.clone(), &ca),
        )
        .unwrap_or_else(|e| panic!("the agent container of {node}: {e}"));
        let pid = tb.agent_pid(node).expect("the agent's pid");
        let caps = u64::from_str_radix(&status_field(pid, "CapEff"), 16).expect("CapEff");
        let expected = [CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE]
            .iter()
            .fold(0u64, |bits, cap| bits | 1 << cap);
        assert_eq!(
            caps, expected,
            "{node}: exactly the DaemonSet's four capabilities"
        );
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(
            status_field(pid, "Seccomp"),
            "2",
            "{node}: RuntimeDefault, a filter that allows what its capabilities need"
        );
        assert!(root_read_only(pid), "{node}: read-only root filesystem");
        // /metrics on the node's address ($(HOST_IP) from status.hostIP), not on all of them.
        let node_ip = tb.node(node).expect("node").ipv4();
        let metrics = SocketAddr::from((node_ip, 15090));
        let (status, _) = tb
            .get_on_node(node, metrics, "/metrics")
            .unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!(status, 200, "{node}");
        let loopback = SocketAddr::from(([127, 0, 0, 1], 15090));
        assert!(
            tb.get_on_node(node, loopback, "/metrics").is_err(),
            "{node}"
        );
        // The kubelet made the hostPath /run/nodemesh 0755 (DirectoryOrCreate); the agent
        // keeps its handoff socket there and narrowed it to 0700.
        let run = tb.node_run_dir(node);
        let mode = std::fs::metadata(&run)
            .expect("/run/nodemesh")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{node}: {}", run.display());
        let socket = std::fs::metadata(run.join("handoff.sock")).expect("handoff socket");
        assert!(socket.file_type().is_socket(), "{node}");
        assert_eq!(
            status_field(pid, "NSpid").split_whitespace().count(),
            1,
            "{node}: the host's PID namespace"
        );
    }

    // The agents hold the meshed pods' certificates from the CA's container (readiness needs
    // them); client-a's connect is captured on node1, crosses to node2 over HBONE and is
    // counted on both sides.
    let server = tb.pod("mesh", "server-b").clone();
    tb.wait_pod_enrolled(&client, true)
        .expect("client-a enrolled");
    tb.start_echo_server(&server, 7000).expect("echo server");
    let mut echo = Command::new(tb.workload_bin());
    echo.args(["echo-client", "--target"])
        .arg(format!("{}:7000", server.ipv4()))
        .args(["--bytes", "65536", "--connections", "3"]);
    let output = tb.run_in_pod(&client, echo).expect("echo client");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let destination = format!("{}:7000", server.ipv4());
    wait_until(
        Duration::from_secs(5),
        "both proxies counted the connections",
        || {
            let counted = |node: &str, source: &str| -> nodemesh_testbed::Result<u64> {
                let stats = tb.admin_json(node, "/stats")?;
                Ok(stats["connections"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["source_pod"] == source && s["destination"] == destination)
                    .map(|s| s["closed"].as_u64().unwrap_or(0))
                    .sum())
            };
            Ok(counted("node1", "mesh/client-a")? == 3
                && counted("node2", "spiffe://cluster.local/ns/mesh/sa/client-a")? == 3)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nnode1: {}\nnode2: {}",
            tb.agent_log("node1"),
            tb.agent_log("node2")
        )
    });
    let dump = tb.admin_json("node2", "/config_dump").expect("config dump");
    let server_entry = dump["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "server-b")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(
        server_entry["source_preservation"],
        serde_json::json!({"ipv4": true, "ipv6": true}),
        "the agent set the pod's policy routing and sysctls from its container: {server_entry}"
    );

    // As `kubectl exec ds/nodemesh-agent -- nodemesh status` (docs/install.md).
    let container = tb
        .agent_container_id("node1")
        .expect("node1's agent container");
    let status = runtime
        .exec(&container, &["nodemesh", "status"])
        .expect("ctr tasks exec");
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && said.contains("client-a"),
        "{said}"
    );
    let version = runtime
        .exec(&container, &["nodemesh", "--version"])
        .expect("ctr tasks exec");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with(&format!("nodemesh {} (revision ", image.tag)),
        "{version}"
    );

    // The container's output is not a terminal: JSON lines, no colour escapes (node2's log:
    // only the one agent that ran there).
    let log = tb.agent_log("node2");
    let lines: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.starts_with("=== ") || !l.contains("pod nodemesh-system"))
        .filter(|l| !l.starts_with("=== "))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(!log.contains('\u{1b}'), "no ANSI escapes: {log}");
    for line in &lines {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}
