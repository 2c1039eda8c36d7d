//! Self-test of the testbed without agents: real traffic between pods across nodes over IPv4
//! and IPv6, cluster-state contents, changing pods, and teardown leaving nothing behind (also
//! after a panic, after a failed creation, and for a dead owner's leftovers). Needs root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use k8s_openapi::api::core::v1::{Namespace, Pod as K8sPod};
use nodemesh_testbed::{
    ClusterMode, NETNS_DIR, Pod, PodSpec, Testbed, TestbedConfig, TopologySpec, cgroup2_root,
    cluster_state, is_root, leftovers, sweep_stale,
};
use serde_json::Value;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_nodemesh-workload");

fn config(prefix: &str) -> TestbedConfig {
    TestbedConfig {
        prefix: prefix.into(),
        // No agent is started here; the path only has to be recorded.
        nodemesh_bin: PathBuf::from("/nonexistent/nodemesh"),
        workload_bin: PathBuf::from(WORKLOAD),
        log_dir: None,
        cluster: ClusterMode::Manifests,
        chart_values: Vec::new(),
        worker_threads: Vec::new(),
    }
}

/// These tests are never skipped: without root they fail and say why.
fn require_root() {
    assert!(
        is_root(),
        "the testbed needs root (network namespaces, cgroups, bpffs): run `cargo xtask test` as root"
    );
}

fn workload(args: &[&str]) -> Command {
    let mut command = Command::new(WORKLOAD);
    command.args(args);
    command
}

/// Runs the workload in `pod`, asserts it succeeded, returns its JSON summary.
fn run_json(tb: &Testbed, pod: &Pod, args: &[&str]) -> Value {
    let output = tb
        .run_in_pod(pod, workload(args))
        .expect("running the workload");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?} in {} failed ({}): stdout {stdout} stderr {}",
        pod.key(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"))
}

fn assert_echo_ok(summary: &Value, connections: u64) {
    assert_eq!(summary["ok"], connections, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["peer_mismatch"], 0, "{summary}");
}

fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

#[test]
fn echo_across_nodes_then_nothing_left_behind() {
    require_root();
    let tb =
        Testbed::create(config("nmt"), TopologySpec::standard()).expect("creating the testbed");
    let name = tb.name().to_owned();

    // Structure: namespaces, cgroups as the kubelet lays them out, bpffs, cluster state.
    assert!(netns_exists(&format!("{name}-br")));
    for node in ["node1", "node2"] {
        assert!(netns_exists(&format!("{name}-{node}")));
        assert!(tb.cgroup_root(node).join("system").is_dir());
        assert!(tb.cgroup_root(node).join("kubepods/besteffort").is_dir());
        assert!(tb.bpffs_dir(node).is_dir());
    }
    assert_eq!(tb.pods().len(), 5);
    for pod in tb.pods() {
        assert!(netns_exists(pod.netns()), "{}", pod.netns());
        assert_eq!(
            pod.pod_cgroup(),
            tb.cgroup_root(pod.node())
                .join(format!("kubepods/besteffort/pod{}", pod.uid()))
        );
        assert!(pod.cgroup().is_dir());
        assert_eq!(pod.container_id().len(), 64);
        let sandbox_procs =
            std::fs::read_to_string(pod.sandbox_cgroup().join("cgroup.procs")).unwrap();
        assert_eq!(sandbox_procs.trim(), pod.sandbox_pid().to_string());
    }
    let state = tb.cluster_state_dir();
    let mesh: Namespace =
        serde_yaml::from_str(&std::fs::read_to_string(state.join("namespace-mesh.yaml")).unwrap())
            .unwrap();
    assert_eq!(mesh.metadata.labels.unwrap()["nodemesh.io/mesh"], "enabled");
    let plain: Namespace =
        serde_yaml::from_str(&std::fs::read_to_string(state.join("namespace-plain.yaml")).unwrap())
            .unwrap();
    assert!(
        !plain
            .metadata
            .labels
            .unwrap()
            .contains_key("nodemesh.io/mesh")
    );

    let server = tb.pod("mesh", "server-a").clone();
    let object: K8sPod = serde_yaml::from_str(
        &std::fs::read_to_string(state.join(cluster_state::pod_file("mesh", "server-a"))).unwrap(),
    )
    .unwrap();
    assert_eq!(object.metadata.uid.as_deref(), Some(server.uid()));
    let spec = object.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node1"));
    assert_eq!(spec.service_account_name.as_deref(), Some("server-a"));
    let status = object.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));
    assert_eq!(status.host_ip.as_deref(), Some("198.18.0.1"));
    let ips: Vec<String> = status.pod_ips.unwrap().into_iter().map(|p| p.ip).collect();
    assert_eq!(
        ips,
        vec![server.ipv4().to_string(), server.ipv6().to_string()]
    );
    assert_eq!(
        status.container_statuses.unwrap()[0]
            .container_id
            .as_deref(),
        Some(format!("containerd://{}", server.container_id()).as_str())
    );

    // Traffic: echo server on node1, clients on node2 (IPv4 and IPv6) and on node1.
    let echo = tb
        .spawn_in_pod(
            &server,
            workload(&[
                "echo-server",
                "--ports",
                "7000,7001",
                "--ports",
                "7100-7119",
            ]),
        )
        .expect("starting the echo server");
    for port in [7000, 7001, 7100, 7119] {
        tb.wait_listening(&server, port)
            .expect("echo server listening");
    }
    let echo_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", echo.pid())).unwrap();
    assert!(
        echo_cgroup
            .trim_end()
            .ends_with(&format!("pod{}/{}", server.uid(), server.container_id())),
        "{echo_cgroup}"
    );
    let client_b = tb.pod("mesh", "client-b").clone();
    let client_a = tb.pod("mesh", "client-a").clone();
    let v4 = SocketAddr::new(server.ipv4().into(), 7000).to_string();
    let v6 = SocketAddr::new(server.ipv6().into(), 7001).to_string();
    for (client, target) in [
        (&client_b, &v4),
        (&client_b, &v6),
        (&client_a, &v4),
        (&client_a, &v6),
    ] {
        let summary = run_json(
            &tb,
            client,
            &[
                "echo-client",
                "--target",
                target,
                "--bytes",
                "100000",
                "--connections",
                "3",
            ],
        );
        assert_echo_ok(&summary, 3);
    }
    let many = run_json(
        &tb,
        &client_b,
        &[
            "connect-many",
            "--target-ip",
            &server.ipv4().to_string(),
            "--ports",
            "7100-7119",
            "--connections",
            "200",
        ],
    );
    assert_echo_ok(&many, 200);
    let looped = run_json(
        &tb,
        &client_b,
        &["connect-loop", "--target", &v6, "--count", "50"],
    );
    assert_eq!(looped["count"], 50);

    // HTTP keep-alive between the other pair, from the unmeshed namespace too.
    let server_b = tb.pod("mesh", "server-b").clone();
    let http = tb
        .spawn_in_pod(
            &server_b,
            workload(&["http-server", "--port", "8080", "--body-bytes", "512"]),
        )
        .expect("starting the http server");
    tb.wait_listening(&server_b, 8080)
        .expect("http server listening");
    let outsider = tb.pod("plain", "outsider").clone();
    for target in [
        SocketAddr::new(server_b.ipv4().into(), 8080),
        SocketAddr::new(server_b.ipv6().into(), 8080),
    ] {
        let bench = run_json(
            &tb,
            &outsider,
            &[
                "http-bench",
                "--target",
                &target.to_string(),
                "--requests",
                "200",
                "--concurrency",
                "4",
            ],
        );
        assert_eq!(bench["ok"], 200, "{bench}");
        assert!(bench["p99_us"].as_f64().unwrap() > 0.0, "{bench}");
    }
    drop(http);

    // A detached process is the testbed's to kill at teardown.
    let echo_pid = echo.pid();
    echo.detach();
    let report = tb.teardown().expect("teardown");
    assert!(report.is_clean(), "{report:?}");
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
    assert!(
        !Path::new(&format!("/proc/{echo_pid}")).exists(),
        "echo server survived teardown"
    );
}

#[test]
fn pods_change_while_the_cluster_runs() {
    require_root();
    let mut tb =
        Testbed::create(config("nmt"), TopologySpec::standard()).expect("creating the testbed");
    let name = tb.name().to_owned();
    let state = tb.cluster_state_dir().to_owned();

    let late = tb
        .add_pod("node2", PodSpec::new("mesh", "late"))
        .expect("adding a pod");
    assert_eq!(late.ipv4().to_string(), "198.18.2.12");
    assert_eq!(late.ipv6().to_string(), "fd77:2::12");
    assert!(state.join("pod-mesh-late.yaml").is_file());
    let echo = tb
        .spawn_in_pod(&late, workload(&["echo-server", "--ports", "7000"]))
        .expect("starting the echo server");
    tb.wait_listening(&late, 7000).expect("listening");
    let client = tb.pod("plain", "outsider").clone();
    let target = SocketAddr::new(late.ipv6().into(), 7000).to_string();
    assert_echo_ok(
        &run_json(
            &tb,
            &client,
            &["echo-client", "--target", &target, "--bytes", "4096"],
        ),
        1,
    );

    let labels = BTreeMap::from([
        ("app".to_owned(), "late".to_owned()),
        ("nodemesh.io/mesh".to_owned(), "disabled".to_owned()),
    ]);
    let relabelled = tb
        .set_pod_labels(&late, labels.clone())
        .expect("relabelling");
    assert_eq!(relabelled.labels(), &labels);
    let object: K8sPod =
        serde_yaml::from_str(&std::fs::read_to_string(state.join("pod-mesh-late.yaml")).unwrap())
            .unwrap();
    assert_eq!(object.metadata.labels.unwrap(), labels);
    tb.set_namespace_labels(
        "plain",
        BTreeMap::from([("nodemesh.io/mesh".to_owned(), "enabled".to_owned())]),
    )
    .expect("labelling a namespace");
    let plain: Namespace =
        serde_yaml::from_str(&std::fs::read_to_string(state.join("namespace-plain.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        plain.metadata.labels.unwrap()["nodemesh.io/mesh"],
        "enabled"
    );
    assert!(
        state.read_dir().unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.'))
    );

    let echo_pid = echo.pid();
    echo.detach();
    tb.remove_pod(&late).expect("removing the pod");
    assert!(!state.join("pod-mesh-late.yaml").exists());
    assert!(!netns_exists(late.netns()));
    assert!(!late.pod_cgroup().exists());
    assert!(!Path::new(&format!("/proc/{echo_pid}")).exists());
    assert!(tb.find_pod("mesh", "late").is_none());

    // Dropping without teardown cleans up too, also processes whose handles are still alive.
    let mut still_held = tb
        .spawn_in_pod(&client, workload(&["pause"]))
        .expect("starting a process");
    drop(tb);
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
    let status = still_held
        .try_wait()
        .unwrap()
        .expect("killed by the teardown");
    assert!(!status.success());
}

#[test]
fn panic_inside_catch_unwind_leaves_nothing_behind() {
    require_root();
    let name = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let tb =
            Testbed::create(config("nmt"), TopologySpec::standard()).expect("creating the testbed");
        *name.lock().unwrap() = Some(tb.name().to_owned());
        let pod = tb.pod("mesh", "server-b").clone();
        tb.spawn_in_pod(&pod, workload(&["echo-server", "--ports", "7000"]))
            .expect("starting the echo server")
            .detach();
        panic!("deliberate panic with a live testbed");
    }));
    assert!(result.is_err());
    let name = name
        .lock()
        .unwrap()
        .clone()
        .expect("the testbed was created");
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
}

/// Entries of `dir` whose names start with `prefix`.
fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|read| {
            read.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn failed_creation_removes_what_it_made() {
    require_root();
    let mut broken = config("nmtf");
    broken.workload_bin = PathBuf::from("/nonexistent/nodemesh-workload");
    let error = Testbed::create(broken, TopologySpec::standard()).expect_err("no pause binary");
    assert!(error.to_string().contains("nodemesh-workload"), "{error}");
    let ours = format!("nmtf{}x", std::process::id());
    for dir in [
        PathBuf::from(NETNS_DIR),
        cgroup2_root().unwrap(),
        PathBuf::from("/sys/fs/bpf"),
        std::env::temp_dir(),
    ] {
        let found: Vec<String> = entries_starting_with(&dir, &ours)
            .into_iter()
            .filter(|n| !n.ends_with("-logs"))
            .collect();
        assert!(found.is_empty(), "left in {}: {found:?}", dir.display());
    }
}

#[test]
fn sweep_stale_removes_a_dead_owners_leftovers() {
    require_root();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let name = format!("nmts{}x0", gone.id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &format!("{name}-node1")])
            .status()
            .unwrap()
            .success()
    );
    let cgroup = cgroup2_root().unwrap().join(&name).join("node1/system");
    std::fs::create_dir_all(&cgroup).unwrap();
    std::fs::create_dir_all(Path::new("/sys/fs/bpf").join(&name).join("node1")).unwrap();
    std::fs::create_dir_all(std::env::temp_dir().join(format!("{name}-cluster-state"))).unwrap();
    let mut orphan = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), orphan.id().to_string()).unwrap();
    assert_eq!(leftovers(&name).len(), 4, "{:?}", leftovers(&name));

    let removed = sweep_stale("nmts");
    assert!(removed.iter().any(|r| r.starts_with(&name)), "{removed:?}");
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
    let status = orphan.wait().unwrap();
    assert!(
        !status.success(),
        "the orphan in the stale cgroup was killed"
    );
}

/// The testbed on a real API server: the chart's CRDs and RBAC and the Gateway API CRDs are
/// installed, nodes and agent pods exist, every pod's object carries the UID of its cgroup
/// and the status the testbed reported as kubelet, label changes and deletions reach the API
/// server, and teardown stops the control plane with the rest.
#[test]
fn the_cluster_state_lives_in_a_real_api_server() {
    require_root();
    let tb = Testbed::create(
        config("nmta").with_cluster(ClusterMode::ApiServer),
        TopologySpec::standard(),
    )
    .expect("creating the testbed");
    let name = tb.name().to_owned();
    let api = tb.api().expect("an API server");
    let kubectl = |args: &[&str]| api.kubectl_ok(args).expect("kubectl");

    let crds = kubectl(&["get", "crd", "-o", "name"]);
    for crd in [
        "authorizationpolicies.nodemesh.io",
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
    ] {
        assert!(crds.contains(crd), "{crd} missing from {crds}");
    }
    let can_i = kubectl(&[
        "auth",
        "can-i",
        "watch",
        "pods",
        "--as=system:serviceaccount:nodemesh-system:nodemesh-agent",
    ]);
    assert_eq!(
        can_i.trim(),
        "yes",
        "the chart's RBAC lets the agent watch pods"
    );
    let cannot = api
        .kubectl(&[
            "auth",
            "can-i",
            "delete",
            "pods",
            "--as=system:serviceaccount:nodemesh-system:nodemesh-agent",
        ])
        .expect("kubectl");
    assert_eq!(String::from_utf8_lossy(&cannot.stdout).trim(), "no");

    let nodes = kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"]);
    assert_eq!(nodes.trim(), "node1 node2");
    for node in ["node1", "node2"] {
        let agent_node = kubectl(&[
            "-n",
            "nodemesh-system",
            "get",
            "pod",
            &format!("nodemesh-agent-{node}"),
            "-o",
            "jsonpath={.spec.nodeName}",
        ]);
        assert_eq!(agent_node, node);
        assert!(tb.agent_kubeconfig(node).expect("kubeconfig").is_file());
    }

    let server = tb.pod("mesh", "server-a").clone();
    let object: K8sPod = serde_json::from_str(&kubectl(&[
        "-n", "mesh", "get", "pod", "server-a", "-o", "json",
    ]))
    .expect("pod JSON");
    assert_eq!(object.metadata.uid.as_deref(), Some(server.uid()));
    assert!(
        server
            .pod_cgroup()
            .ends_with(format!("pod{}", server.uid()))
    );
    let status = object.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(
        status.pod_ip.as_deref(),
        Some(server.ipv4().to_string().as_str())
    );
    assert_eq!(
        object.spec.expect("spec").node_name.as_deref(),
        Some("node1")
    );

    let mut tb = tb;
    let relabelled = tb
        .set_pod_labels(&server, BTreeMap::from([("tier".into(), "backend".into())]))
        .expect("relabel");
    let labels = tb
        .api()
        .unwrap()
        .kubectl_ok(&[
            "-n",
            "mesh",
            "get",
            "pod",
            "server-a",
            "-o",
            "jsonpath={.metadata.labels}",
        ])
        .unwrap();
    assert_eq!(labels, r#"{"tier":"backend"}"#);
    tb.set_namespace_labels("plain", BTreeMap::from([("team".into(), "x".into())]))
        .expect("relabel namespace");
    let ns_labels = tb
        .api()
        .unwrap()
        .kubectl_ok(&[
            "get",
            "ns",
            "plain",
            "-o",
            "jsonpath={.metadata.labels.team}",
        ])
        .unwrap();
    assert_eq!(ns_labels, "x");
    tb.remove_pod(&relabelled).expect("remove pod");
    let gone = tb
        .api()
        .unwrap()
        .kubectl(&["-n", "mesh", "get", "pod", "server-a"])
        .unwrap();
    assert!(!gone.status.success(), "the pod object is deleted");

    let report = tb.teardown().expect("teardown");
    assert!(report.is_clean(), "{report:?}");
    assert!(leftovers(&name).is_empty(), "{:?}", leftovers(&name));
}
