//! Operating the mesh from a laptop, against the real API server: each agent reports its node
//! in a MeshNode object that follows enrolment, may write no other node's object (the
//! chart's ValidatingAdmissionPolicy, attacked with a real agent token), and is marked
//! silent by the CA's sweep when it dies; the objects of deleted nodes go. `nodemesh
//! status`, `nodemesh top` (through the API server's pod proxy and through Prometheus),
//! `nodemesh check` and `kubectl nodemesh` (the binary as a kubectl plugin) run in a tmux
//! terminal in the control plane's namespace with only a kubeconfig, as on an operator's
//! laptop, and the tests read the screen. Needs root.

use std::{collections::BTreeMap, process::Command, time::Duration};

use nodemesh_testbed::{
    AgentOptions, MESH_LABEL, MeshCa, PodSpec, Signal, Testbed, TestbedConfig, Tmux, TopologySpec,
    cluster_state, docs, is_root, observability::PROMETHEUS_PORT, scaled, wait_until,
};
use serde_json::Value;

const WEB: &str = "198.18.200.40";
const APP_PORT: u16 = 8080;
const METRICS_PORT: u16 = 15090;
const PROXY_PORT: u16 = 15001;

/// Two nodes whose agents write their MeshNode every second, with the CA (which sweeps
/// every second) and an HTTP server behind Service `web` on server-b.
fn setup(prefix: &str) -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace(prefix).expect("config");
    let tb = Testbed::create(config, TopologySpec::standard_with_ca()).expect("testbed");
    let ca = tb
        .start_ca(&tb.pod("nodemesh-system", "ca").clone(), 3600)
        .expect("CA");
    for node in ["node1", "node2"] {
        let mut extra_args = ca.agent_args(node);
        extra_args.extend([
            "--node-status-interval-seconds".to_owned(),
            "1".to_owned(),
            "--metrics-addr".to_owned(),
            format!("{}:{METRICS_PORT}", tb.node(node).expect("node").ipv4()),
        ]);
        let options = AgentOptions {
            extra_args,
            ..Default::default()
        };
        tb.start_agent(node, &options).expect("agent");
    }
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_http_server(&server, APP_PORT)
        .expect("http server");
    let service = cluster_state::service_object("mesh", "web", WEB, 80, "http");
    tb.apply_object("service-web.yaml", &service)
        .expect("service");
    let slice = cluster_state::endpoint_slice_object("web", "http", APP_PORT, &[(&server, false)]);
    tb.apply_object("endpointslice-web.yaml", &slice)
        .expect("slice");
    (tb, ca)
}

/// A meshed pod on node1 that stays pending: an application holds the proxy's port in it
/// before it opts in.
fn add_blocked_pod(tb: &mut Testbed) {
    let blocked = tb
        .add_pod(
            "node1",
            PodSpec::new("mesh", "blocked").with_label(MESH_LABEL, "disabled"),
        )
        .expect("pod");
    tb.start_echo_server(&blocked, PROXY_PORT)
        .expect("port taker");
    tb.set_pod_labels(
        &blocked,
        BTreeMap::from([("app".to_owned(), "blocked".to_owned())]),
    )
    .expect("opt in");
}

fn mesh_node(tb: &Testbed, node: &str) -> Option<Value> {
    let api = tb.api().expect("api");
    let output = api
        .kubectl(&["get", "meshnode", node, "-o", "json"])
        .expect("kubectl");
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).expect("JSON"))
}

fn wait_mesh_node(tb: &Testbed, node: &str, what: &str, test: impl Fn(&Value) -> bool) -> Value {
    let mut last = None;
    wait_until(scaled(Duration::from_secs(20)), what, || {
        last = mesh_node(tb, node);
        Ok(last.as_ref().is_some_and(&test))
    })
    .unwrap_or_else(|e| panic!("{e}: {last:?}"));
    last.unwrap_or_default()
}

fn enrolled_in_dump(tb: &Testbed, node: &str) -> u64 {
    let dump = tb.admin_json(node, "/config_dump").expect("dump");
    dump["enrolled_pods"]
        .as_array()
        .map_or(0, |p| p.len() as u64)
}

/// kubectl with the token node1's agent holds (bound to its agent pod on node1).
fn kubectl_as_agent_of_node1(tb: &Testbed, args: &[&str]) -> std::process::Output {
    let api = tb.api().expect("api");
    let mut kubectl = Command::new(api.testenv().bin("kubectl").expect("kubectl"));
    kubectl.args(args).env(
        "KUBECONFIG",
        tb.agent_kubeconfig("node1").expect("kubeconfig"),
    );
    api.output_in_netns(kubectl).expect("kubectl")
}

#[test]
fn each_agent_reports_its_node_in_a_mesh_node_and_may_write_no_other() {
    let (mut tb, ca) = setup("nmmnode");
    // The objects appear, ready, with what the agents' admin APIs say.
    for node in ["node1", "node2"] {
        let enrolled = enrolled_in_dump(&tb, node);
        assert!(enrolled > 0);
        let object = wait_mesh_node(&tb, node, "the MeshNode is written", |o| {
            // The certificates may arrive after readiness: wait for their expiry too.
            o["status"]["ready"] == true
                && o["status"]["pods"]["enrolled"] == enrolled
                && o["status"]["earliestCertificateExpiry"].is_string()
        });
        let status = &object["status"];
        assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status}");
        assert!(
            status["revision"].as_str().is_some_and(|r| r.len() >= 7),
            "{status}"
        );
        assert_eq!(status["failMode"], "open");
        assert!(status["earliestCertificateExpiry"].is_string(), "{status}");
        assert_eq!(status["heartbeatIntervalSeconds"], 1);
        let features = status["kernel"]["features"].to_string();
        assert!(features.contains("sk_lookup"), "{status}");
    }
    // It follows enrolment: a new pod, then a pending one with its reason.
    let before = enrolled_in_dump(&tb, "node1");
    tb.add_pod("node1", PodSpec::new("mesh", "arrives"))
        .expect("pod");
    wait_mesh_node(&tb, "node1", "the new pod counted", |o| {
        o["status"]["pods"]["enrolled"] == before + 1
    });
    add_blocked_pod(&mut tb);
    let object = wait_mesh_node(&tb, "node1", "the pending pod reported", |o| {
        o["status"]["pods"]["pending"] == 1
    });
    let pending = &object["status"]["pendingPods"][0];
    assert_eq!(pending["pod"], "mesh/blocked", "{object}");
    assert!(
        pending["reason"].as_str().unwrap_or("").contains("15001"),
        "{object}"
    );
    // kubectl shows the chart's columns.
    let api = tb.api().expect("api");
    let table = api.kubectl_ok(&["get", "meshnodes"]).expect("get");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "PODS",
            "PENDING",
            "CERT-EXPIRY",
            "VERSION",
            "AGE"
        ],
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("node1") && l.contains("true")),
        "{table}"
    );

    // The attack: node1's agent token writes node2's object, or makes one for a node it is
    // not on. First the precondition: that token may write its own node's object.
    let patch = r#"{"status":{"configErrorCount":0}}"#;
    let own = kubectl_as_agent_of_node1(
        &tb,
        &[
            "patch",
            "meshnode",
            "node1",
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        ],
    );
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let other = kubectl_as_agent_of_node1(
        &tb,
        &[
            "patch",
            "meshnode",
            "node2",
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        ],
    );
    let refusal = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(
        refusal.contains("may write only the MeshNode of its own node, not node2"),
        "{refusal}"
    );
    let manifest = tb.log_dir().join("meshnode-node9.json");
    std::fs::write(
        &manifest,
        r#"{"apiVersion":"nodemesh.io/v1alpha1","kind":"MeshNode","metadata":{"name":"node9"},"spec":{}}"#,
    )
    .expect("manifest");
    let created =
        kubectl_as_agent_of_node1(&tb, &["create", "-f", &manifest.display().to_string()]);
    assert!(!created.status.success());
    assert!(
        String::from_utf8_lossy(&created.stderr).contains("its own node, not node9"),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    // An agent that dies is marked silent by the CA within a few heartbeats.
    tb.kill_agent("node2", Signal::SIGKILL).expect("kill");
    let object = wait_mesh_node(&tb, "node2", "node2 marked silent", |o| {
        o["status"]["ready"] == false && o["status"]["notReadyReason"] == "AgentSilent"
    });
    assert!(object["status"]["heartbeatTime"].is_string());

    // The object of a node that is deleted goes with it.
    let node9 = tb.log_dir().join("node9.json");
    std::fs::write(
        &node9,
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node9"}}"#,
    )
    .expect("node manifest");
    api.kubectl_ok(&["create", "-f", &node9.display().to_string()])
        .expect("node9");
    api.kubectl_ok(&["create", "-f", &manifest.display().to_string()])
        .expect("an admin may create any MeshNode");
    api.kubectl_ok(&["delete", "node", "node9"])
        .expect("delete node");
    wait_until(
        scaled(Duration::from_secs(10)),
        "node9's MeshNode removed",
        || Ok(mesh_node(&tb, "node9").is_none()),
    )
    .expect("removed");
    let log = ca.log();
    assert!(log.contains("node gone: its MeshNode removed"), "{log}");
    assert!(
        log.contains("agent silent: MeshNode marked not ready"),
        "{log}"
    );
}

/// An operator's terminal: a tmux session in the control plane's network namespace (where
/// no agent runs, as on a laptop) with `KUBECONFIG` set to the admin's and a directory with
/// `kubectl-nodemesh` first on `PATH`.
struct Terminal<'a> {
    tb: &'a Testbed,
    tmux: Tmux,
    plugin_dir: tempfile::TempDir,
}

impl<'a> Terminal<'a> {
    fn new(tb: &'a Testbed) -> Self {
        let plugin_dir = tempfile::tempdir().expect("plugin dir");
        std::os::unix::fs::symlink(
            tb.nodemesh_bin(),
            plugin_dir.path().join("kubectl-nodemesh"),
        )
        .expect("kubectl-nodemesh");
        Self {
            tb,
            tmux: Tmux::new(&format!("{}-op", tb.name()), 200, 50),
            plugin_dir,
        }
    }

    /// The command line that runs `program args` as the operator.
    fn command_line(&self, program: &str, args: &str) -> String {
        let api = self.tb.api().expect("api");
        let kubectl_dir = api.testenv().bin("kubectl").expect("kubectl");
        let kubectl_dir = kubectl_dir.parent().expect("bin dir");
        format!(
            "ip netns exec {} env KUBECONFIG={} HOME=/nonexistent PATH={}:{}:/usr/sbin:/usr/bin:/sbin:/bin {program} {args}",
            api.netns(),
            api.admin_kubeconfig().display(),
            self.plugin_dir.path().display(),
            kubectl_dir.display(),
        )
    }

    /// Runs a command to its end and returns the screen and its exit status.
    fn run(&self, program: &str, args: &str) -> (String, i32) {
        let line = format!(
            "sh -c '{}; echo EXIT=$?; sleep 600'",
            self.command_line(program, args)
        );
        self.tmux.start(&line);
        let screen = self
            .tmux
            .wait_screen(
                scaled(Duration::from_secs(30)),
                &format!("{program} {args} to end"),
                |s| s.contains("EXIT="),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let code = screen
            .rsplit_once("EXIT=")
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(-1);
        (screen, code)
    }

    /// Runs the live view until its screen satisfies `shown`, then quits it with `q`.
    fn watch(&self, args: &str, what: &str, shown: impl Fn(&str) -> bool) -> String {
        let nodemesh = self.tb.nodemesh_bin().display().to_string();
        self.tmux.start(&self.command_line(&nodemesh, args));
        let seen = self
            .tmux
            .wait_screen(scaled(Duration::from_secs(30)), what, shown);
        self.tmux.send_keys("q");
        seen.unwrap_or_else(|e| panic!("{e}"))
    }
}

#[test]
fn status_top_check_and_the_kubectl_plugin_work_from_a_laptop() {
    let (mut tb, ca) = setup("nmlaptop");
    add_blocked_pod(&mut tb);
    for node in ["node1", "node2"] {
        wait_mesh_node(&tb, node, "the MeshNode is written", |o| {
            o["status"]["ready"] == true
        });
    }
    wait_mesh_node(&tb, "node1", "the pending pod reported", |o| {
        o["status"]["pods"]["pending"] == 1
    });
    let terminal = Terminal::new(&tb);
    let nodemesh = tb.nodemesh_bin().display().to_string();

    // No agent here, a kubeconfig at hand: the whole cluster, problems first.
    let (screen, code) = terminal.run(&nodemesh, "status");
    assert_eq!(code, 0, "{screen}");
    assert!(
        screen.contains("no nodemesh agent at 127.0.0.1:15020"),
        "{screen}"
    );
    assert!(
        screen.contains("cluster: 2 nodes, 2 ready, 1 with problems"),
        "{screen}"
    );
    assert!(
        screen.contains("node1: pod mesh/blocked pending: ") && screen.contains("15001"),
        "{screen}"
    );
    let rows: Vec<&str> = screen
        .lines()
        .filter(|l| l.starts_with("  node") && !l.contains(": "))
        .collect();
    assert!(
        rows.len() == 2 && rows[0].starts_with("  node1 "),
        "problems first: {screen}"
    );

    // top across the cluster, through the API server's pod proxy, then through Prometheus.
    let client = tb.pod("mesh", "client-a").clone();
    let mut load = Command::new(tb.workload_bin());
    load.args([
        "http-get",
        "--target",
        &format!("{WEB}:80"),
        "--count",
        "1000000",
    ]);
    let _load = tb.spawn_in_pod(&client, load).expect("load");
    let row = |screen: &str| {
        screen.lines().any(|l| {
            l.contains("mesh/client-a")
                && l.contains("web.mesh.svc.cluster.local")
                && l.contains("100.0%")
        })
    };
    let screen = terminal.watch("top", "top shows client-a → web", |s| {
        row(s) && s.contains("2 agents in nodemesh-system via the API server (2 answered)")
    });
    assert!(screen.contains("nodemesh top"), "{screen}");
    let api = tb.api().expect("api");
    let scrape = docs::example("telemetry.md", "prometheus-scrape").expect("scrape job");
    let prometheus = api
        .start_prometheus(&serde_yaml::to_string(&scrape).expect("YAML"))
        .expect("prometheus");
    let url = format!("http://{}:{PROMETHEUS_PORT}", api.api_server_addr().ip());
    let _prometheus = prometheus;
    terminal.watch(
        &format!("top --prometheus {url} --interval-seconds 2"),
        "top via Prometheus shows client-a → web",
        |s| row(s) && s.contains(&format!("Prometheus at {url}")),
    );

    // check: first on an installation with everything in place (the CA here starts from
    // files, so the issuer Secret and trust bundle are created from them, and the CA's pod
    // gets the Deployment's label), then with a CRD missing and a node under the floor.
    install_ca_objects(&tb, &ca);
    let (screen, code) = terminal.run(&nodemesh, "check");
    assert_eq!(code, 0, "{screen}");
    for line in [
        "ok    CRDs               httproutes.gateway.networking.k8s.io established",
        "ok    CRDs               grpcroutes.gateway.networking.k8s.io established",
        "ok    kernel             2 nodes at or above 6.1",
        "ok    meshed namespaces  mesh",
        "ok    trust bundle       1 root certificate(s)",
        "ok    CA                 1 ready pod(s)",
    ] {
        assert!(screen.contains(line), "{line}:\n{screen}");
    }
    let old_node = tb.log_dir().join("old-node.json");
    std::fs::write(
        &old_node,
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"old-node"}}"#,
    )
    .expect("node manifest");
    api.kubectl_ok(&["create", "-f", &old_node.display().to_string()])
        .expect("old node");
    let kernel = r#"{"status":{"nodeInfo":{"kernelVersion":"5.15.0-100-generic","machineID":"m",
        "systemUUID":"s","bootID":"b","kubeletVersion":"v1.36.0","kubeProxyVersion":"",
        "operatingSystem":"linux","architecture":"amd64","containerRuntimeVersion":"",
        "osImage":"Ubuntu 22.04"}}}"#;
    api.kubectl_ok(&[
        "patch",
        "node",
        "old-node",
        "--subresource=status",
        "--type=merge",
        "-p",
        kernel,
    ])
    .expect("old node's kernel");
    api.kubectl_ok(&["delete", "crd", "httproutes.gateway.networking.k8s.io"])
        .expect("delete CRD");
    let (screen, code) = terminal.run(&nodemesh, "check");
    assert_ne!(code, 0, "{screen}");
    assert!(
        screen.contains("FAIL  kernel             node old-node runs kernel 5.15.0-100-generic, below nodemesh's floor 6.1"),
        "{screen}"
    );
    assert!(
        screen.contains("WARN  CRDs               httproutes.gateway.networking.k8s.io is missing"),
        "{screen}"
    );

    // A node whose agent dies shows silent (from its heartbeat, before any sweep), and a
    // node without an agent shows too; the kubectl plugin runs the same code.
    tb.kill_agent("node2", Signal::SIGKILL).expect("kill");
    let mut screen = String::new();
    wait_until(
        scaled(Duration::from_secs(20)),
        "node2 shown silent",
        || {
            screen = terminal.run("kubectl", "nodemesh status").0;
            Ok(screen.contains("node2: agent silent: no heartbeat for"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{screen}"));
    assert!(screen.contains("old-node: no MeshNode"), "{screen}");
    assert!(
        !screen.contains("no nodemesh agent at"),
        "the plugin goes to the cluster at once: {screen}"
    );
    let (screen, code) = terminal.run("kubectl", "nodemesh status --node node1");
    assert_eq!(code, 0, "{screen}");
    assert!(
        screen.contains("node node1: ready (fail mode open)"),
        "{screen}"
    );
    assert!(
        screen.contains("pods      ") && screen.contains("1 pending"),
        "{screen}"
    );
}

/// What the chart's install steps create for the CA (deploy/README.md): the issuer Secret and
/// the trust-bundle ConfigMap from the CA's files, and the Deployment's label on its pod.
fn install_ca_objects(tb: &Testbed, ca: &MeshCa) {
    tb.publish_ca_objects(ca.dir())
        .expect("issuer Secret and trust bundle");
    let api = tb.api().expect("api");
    api.kubectl_ok(&[
        "-n",
        "nodemesh-system",
        "label",
        "pod",
        "ca",
        "app.kubernetes.io/name=nodemesh-ca",
    ])
    .expect("label");
}
