//! An agent starting on a node that changed while no agent (or only its predecessor) watched
//! it (docs/lifecycle.md, "Start-up reconciliation"): pods gone, emptied, replaced, new or
//! with the proxy's port taken, a link of another agent version, maps of another layout,
//! foreign and corrupt map entries. The new agent must stay up, become ready, carry meshed
//! traffic, leave the pinned maps holding exactly what the cluster implies (read from bpffs
//! with aya, not through the agent), say in its log what it repaired, and never let capture
//! lapse meanwhile (`--fail-mode closed`: a meshed connect is captured or refused, never
//! direct). Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use nodemesh_common::{INBOUND_STRICT, InboundKey, map_names, program_names};
use nodemesh_testbed::{
    AgentOptions, MESH_LABEL, MeshCa, NamespaceSpec, NodeSpec, Pod, PodProcess, PodSpec, Signal,
    Testbed, TestbedConfig, TopologySpec, is_root,
    pinned::{PinnedMaps, inbound_key},
    scaled, wait_until,
};
use serde_json::Value;

const ECHO_PORT: u16 = 7000;
/// server-b's port for the capture watch, so the watch's connections are counted apart.
const WATCH_PORT: u16 = 7001;
const APP_PORT: u16 = 8080;
/// The proxy's outbound port in every meshed pod.
const PROXY_PORT: u16 = 15001;
const PEER_AUTHENTICATION: &str = "nodemesh.io/peer-authentication";

/// node1 holds the pods the tests change; server-b on node2 answers echoes.
fn topology(node1: &[PodSpec]) -> TopologySpec {
    let mut pods = vec![
        PodSpec::new("mesh", "client-a"),
        PodSpec::new("plain", "outsider"),
        PodSpec::new("nodemesh-system", "ca").with_service_account("nodemesh-ca"),
    ];
    pods.extend_from_slice(node1);
    TopologySpec {
        namespaces: vec![
            NamespaceSpec::meshed("mesh"),
            NamespaceSpec::meshed("strict").with_label(PEER_AUTHENTICATION, "strict"),
            NamespaceSpec::new("plain"),
            NamespaceSpec::new("nodemesh-system"),
        ],
        nodes: vec![
            NodeSpec::new("node1", pods),
            NodeSpec::new("node2", vec![PodSpec::new("mesh", "server-b")]),
        ],
    }
}

/// Failing closed; ready (certificates held) within 20 s, stretched under emulation.
fn options(ca: &MeshCa, node: &str) -> AgentOptions {
    AgentOptions {
        fail_mode: "closed".to_owned(),
        extra_args: ca.agent_args(node),
        ready_timeout: scaled(Duration::from_secs(20)),
        ..Default::default()
    }
}

/// The testbed with the CA, both agents failing closed and server-b echoing on 7000.
fn mesh(prefix: &str, node1: &[PodSpec]) -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace(prefix).expect("binaries");
    let tb = Testbed::create(config, topology(node1)).expect("testbed");
    let ca = tb
        .start_ca(&tb.pod("nodemesh-system", "ca").clone(), 3600)
        .expect("CA");
    for node in ["node1", "node2"] {
        tb.start_agent(node, &options(&ca, node)).expect("agent");
    }
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_echo_server(&server, ECHO_PORT).expect("echo");
    tb.start_echo_server(&server, WATCH_PORT).expect("echo");
    (tb, ca)
}

fn echo_target(tb: &Testbed, port: u16) -> String {
    format!("{}:{port}", tb.pod("mesh", "server-b").ipv4())
}

/// One echo from `pod` to server-b's 7000: Ok, or the client's error output.
fn echo(tb: &Testbed, pod: &Pod) -> Result<(), String> {
    echo_to(tb, pod, ECHO_PORT)
}

fn echo_to(tb: &Testbed, pod: &Pod, port: u16) -> Result<(), String> {
    let mut client = Command::new(tb.workload_bin());
    client.args(["echo-client", "--target", &echo_target(tb, port)]);
    client.args(["--bytes", "64"]);
    let output = tb.run_in_pod(pod, client).map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Connections node1's proxy accepted from `pod` to server-b's `port`.
fn proxied_from(tb: &Testbed, pod: &Pod, port: u16) -> u64 {
    let stats = tb.admin_json(pod.node(), "/stats").expect("stats");
    let destination = echo_target(tb, port);
    stats["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["source_pod"] == pod.key() && s["destination"] == destination)
        .map(|s| s["opened"].as_u64().unwrap_or(0))
        .sum()
}

/// An echo from `pod` that node1's proxy carried.
fn assert_carried(tb: &Testbed, pod: &Pod) {
    let before = proxied_from(tb, pod, ECHO_PORT);
    echo(tb, pod).unwrap_or_else(|e| panic!("{}: {e}", pod.key()));
    assert_eq!(
        proxied_from(tb, pod, ECHO_PORT),
        before + 1,
        "{} went through the proxy",
        pod.key()
    );
}

/// Whether plaintext from the test process inside `from`'s network namespace (no cgroup of
/// a pod, so never captured outbound) reaches an echo server at `to` and comes back.
fn plaintext_echoed(tb: &Testbed, from: &Pod, to: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = tb.connect_from_pod(from, to) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut back = [0u8; 5];
    stream.write_all(b"plain").is_ok() && stream.read_exact(&mut back).is_ok() && &back == b"plain"
}

fn cgroup_id(pod: &Pod) -> u64 {
    std::fs::metadata(pod.pod_cgroup())
        .expect("pod cgroup")
        .ino()
}

/// The pending pods node1's agent reports, by name, with their reason.
fn pending(tb: &Testbed) -> BTreeMap<String, String> {
    let dump = tb.admin_json("node1", "/config_dump").expect("config dump");
    dump["pending_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let name = format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            );
            (name, p["reason"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

fn wait_pending(tb: &Testbed, pod: &Pod, reason_has: &str) {
    wait_until(
        scaled(Duration::from_secs(10)),
        &format!("{} pending", pod.key()),
        || {
            Ok(pending(tb)
                .get(&pod.key())
                .is_some_and(|r| r.contains(reason_has)))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", pending(tb)));
}

/// Asserts node1's pinned maps and pins hold exactly what `held` (meshed pods whose
/// cgroup and addresses stay captured, pending or not) and `enrolled` (those with listeners)
/// imply.
fn assert_pinned_exactly(tb: &Testbed, held: &[&Pod], enrolled: &[&Pod]) {
    let state = PinnedMaps::read(&tb.bpffs_dir("node1")).expect("pinned state");
    let flags = |pod: &Pod| {
        if pod.namespace() == "strict" {
            INBOUND_STRICT
        } else {
            0
        }
    };
    // An enrolled pod's every local address is captured (link-local IPv6 too); a pod held
    // while pending keeps its Pod addresses captured.
    let addresses = |pod: &Pod| -> Vec<String> {
        if enrolled.iter().any(|e| e.key() == pod.key()) {
            let local = pod.local_addresses().expect("the pod's addresses");
            local.iter().map(ToString::to_string).collect()
        } else {
            vec![pod.ipv4().to_string(), pod.ipv6().to_string()]
        }
    };
    let cgroups: BTreeMap<u64, u32> = held.iter().map(|p| (cgroup_id(p), 0)).collect();
    assert_eq!(state.enrolled, cgroups, "enrolment map: {state:#?}");
    let inbound: BTreeMap<String, u32> = held
        .iter()
        .flat_map(|p| addresses(p).into_iter().map(|a| (a, flags(p))))
        .collect();
    assert_eq!(state.inbound_pods, inbound, "inbound map: {state:#?}");
    let listeners: BTreeSet<String> = enrolled.iter().flat_map(|p| addresses(p)).collect();
    assert_eq!(state.inbound_listeners, listeners, "listeners: {state:#?}");
    let uids: BTreeSet<String> = held.iter().map(|p| p.uid().to_owned()).collect();
    assert_eq!(state.inbound_links, uids, "inbound links: {state:#?}");
    let maps: BTreeSet<String> = map_names::ALL.iter().map(|m| m.to_string()).collect();
    assert_eq!(state.maps, maps, "pinned maps: {state:#?}");
    assert!(
        state.excluded_ports.is_empty() && state.deliveries == 0,
        "{state:#?}"
    );
    // One link per cgroup program, all of one agent (one generation).
    let programs: BTreeSet<&str> = state
        .links
        .iter()
        .filter_map(|l| l.rsplit_once('-').map(|(program, _)| program))
        .collect();
    let generations: BTreeSet<&str> = state
        .links
        .iter()
        .filter_map(|l| l.rsplit_once('-').map(|(_, g)| g))
        .collect();
    assert_eq!(
        programs,
        BTreeSet::from(program_names::CGROUP),
        "links: {state:#?}"
    );
    assert_eq!(
        (state.links.len(), generations.len()),
        (program_names::CGROUP.len(), 1),
        "links: {state:#?}"
    );
}

/// Connections from client-a to server-b, classified, until [`Watch::finish`].
/// How many of the watch's connections the agent running after a change must carry.
const CARRIED_AFTER_CHANGE: u64 = 10;

struct Watch {
    process: PodProcess,
    stop_file: PathBuf,
}

impl Watch {
    fn start(tb: &Testbed) -> Watch {
        let stop_file = std::env::temp_dir().join(format!("{}-watch-stop", tb.name()));
        let _ = std::fs::remove_file(&stop_file);
        let mut watch = Command::new(tb.workload_bin());
        watch.args(["capture-watch", "--target", &echo_target(tb, WATCH_PORT)]);
        // Under emulation a proxied echo can take seconds; a lost one still times out.
        let timeout = scaled(Duration::from_secs(2)).as_millis().to_string();
        watch.args(["--timeout-ms", &timeout, "--stop-file"]);
        watch.arg(&stop_file);
        watch.stdout(std::process::Stdio::piped());
        let client = tb.pod("mesh", "client-a").clone();
        let before = proxied_from(tb, &client, WATCH_PORT);
        let process = tb.spawn_in_pod(&client, watch).expect("capture watch");
        wait_until(
            scaled(Duration::from_secs(10)),
            "the watch's connections captured",
            || Ok(proxied_from(tb, &client, WATCH_PORT) > before + 1),
        )
        .expect("watch running");
        Watch { process, stop_file }
    }

    /// Stops the watch once the agent now running has carried `carried` more of its
    /// connections, so that capture after the change is shown, not assumed from timing.
    fn finish(self, tb: &Testbed, carried: u64) -> Value {
        let client = tb.pod("mesh", "client-a").clone();
        let before = proxied_from(tb, &client, WATCH_PORT);
        wait_until(
            scaled(Duration::from_secs(20)),
            "the watch's connections carried by the agent now running",
            || Ok(proxied_from(tb, &client, WATCH_PORT) >= before + carried),
        )
        .expect("the watch is captured again");
        std::fs::write(&self.stop_file, b"").expect("stop file");
        let output = self
            .process
            .wait_with_output(scaled(Duration::from_secs(20)))
            .expect("watch");
        let _ = std::fs::remove_file(&self.stop_file);
        let outcomes = serde_json::from_slice(&output.stdout).expect("watch summary");
        eprintln!("capture watch: {outcomes}");
        outcomes
    }
}

/// What the matrix changes on node1 while its agent is stopped or only its predecessor runs.
struct Changes {
    /// Cgroup id and UID of pods that are gone now (removed, or replaced).
    gone: Vec<(u64, String)>,
}

/// Changes node1: one pod removed, one emptied (its cgroup stays), one replaced by a pod of
/// the same name with a new UID, address and service account, one new pod; a cgroup link
/// renamed as an older version's; the enrolment map pinned under an older layout's name and
/// another map's pin taken by a map of another layout.
fn change_node(tb: &mut Testbed) -> Changes {
    let bpffs = tb.bpffs_dir("node1");
    let mut gone = Vec::new();
    for name in ["leaves", "replaced"] {
        let pod = tb.pod("mesh", name).clone();
        gone.push((cgroup_id(&pod), pod.uid().to_owned()));
        tb.remove_pod(&pod).expect("remove pod");
    }
    tb.add_pod(
        "node1",
        PodSpec::new("mesh", "replaced").with_service_account("replaced-v2"),
    )
    .expect("replacement");
    tb.add_pod("node1", PodSpec::new("mesh", "arrives"))
        .expect("new pod");
    tb.empty_pod(&tb.pod("mesh", "emptied").clone())
        .expect("empty pod");
    let link = std::fs::read_dir(bpffs.join("links"))
        .expect("links")
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("nm_connect4-"))
        .expect("a connect4 link");
    let older = link
        .file_name()
        .to_string_lossy()
        .replace("nm_connect4", "nm_capture4");
    std::fs::rename(link.path(), bpffs.join("links").join(older)).expect("rename link");
    let maps = bpffs.join("maps");
    let rename = |from: &str, to: &str| {
        std::fs::rename(maps.join(from), maps.join(to)).unwrap_or_else(|e| panic!("{from}: {e}"))
    };
    rename(map_names::ENROLLED_CGROUPS, "NM_ENROLLED_CGROUPS_V0");
    rename(map_names::DELIVERIES, map_names::EXCLUDED_PORTS);
    Changes { gone }
}

const MATRIX_PODS: [(&str, &str); 5] = [
    ("mesh", "leaves"),
    ("mesh", "emptied"),
    ("mesh", "replaced"),
    ("strict", "guarded"),
    ("strict", "blocked"),
];

/// The matrix's testbed: blocked is held closed (its proxy port taken) before the restart,
/// guarded serves plaintext on 8080 behind STRICT.
fn matrix_testbed(prefix: &str) -> (Testbed, MeshCa) {
    let mut specs: Vec<PodSpec> = MATRIX_PODS
        .iter()
        .map(|(ns, name)| PodSpec::new(ns, name))
        .collect();
    specs[4] = specs[4].clone().with_label(MESH_LABEL, "disabled");
    let (mut tb, ca) = mesh(prefix, &specs);
    for name in ["guarded", "blocked"] {
        tb.start_echo_server(&tb.pod("strict", name).clone(), APP_PORT)
            .expect("app");
    }
    let blocked = tb.pod("strict", "blocked").clone();
    tb.start_echo_server(&blocked, PROXY_PORT)
        .expect("port taker");
    tb.set_pod_labels(
        &blocked,
        BTreeMap::from([("app".to_owned(), "blocked".to_owned())]),
    )
    .expect("opt in");
    wait_pending(&tb, &blocked, &PROXY_PORT.to_string());
    assert_carried(&tb, &tb.pod("mesh", "client-a").clone());
    (tb, ca)
}

/// What both flavours check after the restart.
fn assert_repaired(tb: &Testbed, changes: &Changes, guarded_pending: bool) {
    assert!(tb.agent_running("node1"), "the agent stays up");
    let pod = |ns: &str, name: &str| tb.pod(ns, name).clone();
    let (client, emptied, guarded, blocked) = (
        pod("mesh", "client-a"),
        pod("mesh", "emptied"),
        pod("strict", "guarded"),
        pod("strict", "blocked"),
    );
    let (replaced, arrives) = (pod("mesh", "replaced"), pod("mesh", "arrives"));
    for carried in [&client, &replaced, &arrives] {
        assert_carried(tb, carried);
    }
    let dump = tb.admin_json("node1", "/config_dump").expect("dump");
    let replacement = dump["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["uid"] == replaced.uid());
    assert_eq!(
        replacement.map(|p| &p["service_account"]),
        Some(&Value::from("replaced-v2")),
        "{dump}"
    );
    let pending = pending(tb);
    assert!(
        pending[&emptied.key()].contains("has no processes"),
        "{pending:?}"
    );
    assert!(pending[&blocked.key()].contains("15001"), "{pending:?}");
    assert_eq!(
        pending.contains_key(&guarded.key()),
        guarded_pending,
        "{pending:?}"
    );
    // Held pods stay closed: blocked's connects are refused, plaintext to it goes nowhere.
    assert!(echo(tb, &blocked).is_err_and(|e| e.contains("Operation not permitted")));
    let outsider = pod("plain", "outsider");
    for strict in [&guarded, &blocked] {
        let app = SocketAddr::from((strict.ipv4(), APP_PORT));
        assert!(
            !plaintext_echoed(tb, &outsider, app),
            "{} took plaintext",
            strict.key()
        );
    }
    let held = [&client, &emptied, &replaced, &arrives, &guarded, &blocked];
    let enrolled: Vec<&Pod> = held
        .iter()
        .copied()
        .filter(|p| !pending.contains_key(&p.key()))
        .collect();
    assert_pinned_exactly(tb, &held, &enrolled);
    let state = PinnedMaps::read(&tb.bpffs_dir("node1")).expect("pinned");
    for (cgroup, uid) in &changes.gone {
        assert!(!state.enrolled.contains_key(cgroup) && !state.inbound_links.contains(uid));
    }
}

fn log_since_last_start(tb: &Testbed) -> String {
    let log = tb.agent_log("node1");
    log.rsplit_once("=== testbed")
        .map_or(log.clone(), |(_, last)| last.to_owned())
}

fn assert_logged(log: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            log.contains(needle),
            "the agent's log lacks {needle:?}:\n{log}"
        );
    }
    assert!(
        !log.contains(" ERROR "),
        "the agent logged an error:\n{log}"
    );
}

/// Repairs both flavours log: the link and maps of other versions.
const VERSION_REPAIRS: [&str; 4] = [
    "unpinned the link of another agent",
    "unpinned a map of another layout version",
    "a pinned map has another layout than this agent's: replacing it",
    "pod not enrolled yet; will retry",
];

#[test]
fn a_restart_without_predecessor_repairs_whatever_changed_on_the_node() {
    let (mut tb, ca) = matrix_testbed("nmcold");
    let watch = Watch::start(&tb);
    tb.kill_agent("node1", Signal::SIGKILL).expect("kill");
    let changes = change_node(&mut tb);
    // The proxy's port in guarded is free while no agent runs: an application takes it.
    tb.start_echo_server(&tb.pod("strict", "guarded").clone(), PROXY_PORT)
        .expect("port taker");
    tb.start_agent("node1", &options(&ca, "node1"))
        .expect("the new agent is ready");
    assert_repaired(&tb, &changes, true);
    let outcomes = watch.finish(&tb, CARRIED_AFTER_CHANGE);
    assert_eq!(outcomes["direct"], 0, "capture lapsed: {outcomes}");
    assert!(
        outcomes["refused"].as_u64() > Some(0),
        "no agent, refused: {outcomes}"
    );
    assert!(
        outcomes["captured"].as_u64() > Some(CARRIED_AFTER_CHANGE),
        "{outcomes}"
    );
    // (The stale enrolments went with the enrolment map of the "older layout".)
    let mut needles = vec![
        "removed stale inbound capture entry",
        "removed stale inbound capture link",
        "pending pod held closed",
    ];
    needles.extend(VERSION_REPAIRS);
    assert_logged(&log_since_last_start(&tb), &needles);

    // A held pod that leaves is released: its listener entries, which the kernel dropped
    // when the previous agent died, count as removed (no error).
    let emptied = tb.pod("mesh", "emptied").clone();
    tb.remove_pod(&emptied).expect("remove emptied");
    wait_until(scaled(Duration::from_secs(10)), "emptied released", || {
        Ok(!pending(&tb).contains_key(&emptied.key()))
    })
    .expect("released");
    assert_logged(&log_since_last_start(&tb), &["pending pod released"]);

    // What is left is exactly right: the next agent has nothing to repair.
    tb.kill_agent("node1", Signal::SIGKILL).expect("kill");
    tb.start_agent("node1", &options(&ca, "node1"))
        .expect("ready again");
    assert_logged(&log_since_last_start(&tb), &["repairs=0 retired=5"]);
}

#[test]
fn a_successor_repairs_whatever_changed_on_the_node_and_drops_nothing() {
    let (mut tb, ca) = matrix_testbed("nmhand");
    let watch = Watch::start(&tb);
    let changes = change_node(&mut tb);
    tb.start_successor_agent("node1", &options(&ca, "node1"))
        .expect("successor ready");
    tb.signal_previous_agent("node1", Signal::SIGTERM)
        .expect("SIGTERM");
    let status = tb
        .wait_previous_agent("node1", scaled(Duration::from_secs(30)))
        .expect("exits");
    assert!(status.success(), "the previous agent exited with {status}");
    assert_repaired(&tb, &changes, false);
    let outcomes = watch.finish(&tb, CARRIED_AFTER_CHANGE);
    for outcome in ["direct", "refused", "failed"] {
        assert_eq!(outcomes[outcome], 0, "{outcomes}");
    }
    assert!(
        outcomes["captured"].as_u64() > Some(CARRIED_AFTER_CHANGE),
        "{outcomes}"
    );
    // Both agents append to one log; the repairs are the successor's.
    assert_logged(&tb.agent_log("node1"), &VERSION_REPAIRS);
}

#[test]
fn a_pod_whose_proxy_port_is_taken_is_reported_and_held_closed() {
    let blocked = PodSpec::new("strict", "blocked").with_label(MESH_LABEL, "disabled");
    let (mut tb, ca) = mesh("nmheld", &[blocked]);
    let blocked = tb.pod("strict", "blocked").clone();
    let outsider = tb.pod("plain", "outsider").clone();
    let app = SocketAddr::from((blocked.ipv4(), APP_PORT));
    tb.start_echo_server(&blocked, APP_PORT).expect("app");
    let mut taker = Command::new(tb.workload_bin());
    taker.args(["echo-server", "--ports", &PROXY_PORT.to_string()]);
    let taker = tb.spawn_in_pod(&blocked, taker).expect("port taker");
    tb.wait_listening(&blocked, PROXY_PORT)
        .expect("15001 taken");
    // Outside the mesh the pod is open, as it should be: plaintext reaches it, its connects
    // go out directly. Without the fix it stayed so once meshed, for as long as 15001 was
    // taken: uncaptured and without STRICT.
    assert!(plaintext_echoed(&tb, &outsider, app));
    echo(&tb, &blocked).expect("direct while outside the mesh");
    assert_eq!(proxied_from(&tb, &blocked, ECHO_PORT), 0);

    tb.set_pod_labels(&blocked, BTreeMap::from([("app".into(), "blocked".into())]))
        .expect("opt in");
    wait_pending(&tb, &blocked, "127.0.0.1:15001");
    let assert_held_closed = |tb: &Testbed| {
        let refused = echo(tb, &blocked);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("Operation not permitted")),
            "{refused:?}"
        );
        assert!(
            !plaintext_echoed(tb, &outsider, app),
            "plaintext reached a STRICT pod"
        );
        let state = PinnedMaps::read(&tb.bpffs_dir("node1")).expect("pinned");
        assert_eq!(
            state.enrolled.get(&cgroup_id(&blocked)),
            Some(&0),
            "{state:#?}"
        );
        let address = blocked.ipv4().to_string();
        assert_eq!(
            state.inbound_pods.get(&address),
            Some(&INBOUND_STRICT),
            "{state:#?}"
        );
        assert!(state.inbound_links.contains(blocked.uid()), "{state:#?}");
    };
    assert_held_closed(&tb);
    let (_, metrics) = tb.admin_get("node1", "/metrics").expect("metrics");
    assert!(metrics.contains("nodemesh_pending_pods 1"), "{metrics}");
    let status = Command::new("ip")
        .args(["netns", "exec", tb.node("node1").expect("node").netns()])
        .arg(tb.nodemesh_bin())
        .arg("status")
        .output()
        .expect("nodemesh status");
    let status = String::from_utf8_lossy(&status.stdout);
    for needle in [
        "PENDING PODS (1)",
        "strict/blocked",
        "127.0.0.1:15001",
        "held: connects refused (fail mode closed); plaintext dropped (STRICT)",
    ] {
        assert!(
            status.contains(needle),
            "status lacks {needle:?}:\n{status}"
        );
    }

    // A restart keeps it closed (stale-entry cleanup used to drop a pending pod's capture).
    tb.kill_agent("node1", Signal::SIGKILL).expect("kill");
    tb.start_agent("node1", &options(&ca, "node1"))
        .expect("ready");
    wait_pending(&tb, &blocked, "127.0.0.1:15001");
    assert_held_closed(&tb);

    // The port freed, the pod is enrolled and captured.
    taker.kill().expect("stop the port taker");
    tb.wait_pod_enrolled(&blocked, true).expect("enrolled");
    assert_carried(&tb, &blocked);
    let (_, metrics) = tb.admin_get("node1", "/metrics").expect("metrics");
    assert!(metrics.contains("nodemesh_pending_pods 0"), "{metrics}");
}

#[test]
fn foreign_and_corrupt_map_entries_are_repaired_not_fatal() {
    let (tb, ca) = mesh("nmforeign", &[PodSpec::new("mesh", "server-a")]);
    let client = tb.pod("mesh", "client-a").clone();
    let server = tb.pod("mesh", "server-a").clone();
    let outsider = tb.pod("plain", "outsider").clone();
    let app = SocketAddr::from((server.ipv4(), APP_PORT));
    tb.start_echo_server(&server, APP_PORT).expect("app");
    assert_carried(&tb, &client);
    assert!(
        plaintext_echoed(&tb, &outsider, app),
        "PERMISSIVE delivers plaintext"
    );
    tb.kill_agent("node1", Signal::SIGKILL).expect("kill");

    let maps = PinnedMaps::at(&tb.bpffs_dir("node1"));
    // Foreign: a pod outside the mesh enrolled, a port excluded that no flag asks for, an
    // address of no meshed pod and a key of no address under inbound capture.
    maps.enrol(cgroup_id(&outsider), 0).expect("write");
    maps.exclude_port(ECHO_PORT).expect("write");
    let garbage = InboundKey {
        addr: [1, 2, 3, 4],
        family: 7,
        _pad: 0,
    };
    maps.set_inbound(garbage, INBOUND_STRICT).expect("write");
    maps.set_inbound(inbound_key(outsider.ipv4().into()), INBOUND_STRICT)
        .expect("write");
    // Corrupt: unknown enrolment flags; a PERMISSIVE pod's address marked STRICT.
    maps.enrol(cgroup_id(&client), 0xdead_beef).expect("write");
    maps.set_inbound(inbound_key(server.ipv4().into()), INBOUND_STRICT)
        .expect("write");
    // They are in force while no agent runs (fail mode closed): the outsider is refused,
    // client-a's connects to the excluded port escape capture while another port is refused,
    // plaintext to the PERMISSIVE pod is dropped.
    let refused =
        |result: Result<(), String>| result.is_err_and(|e| e.contains("Operation not permitted"));
    assert!(
        refused(echo_to(&tb, &outsider, WATCH_PORT)),
        "the foreign enrolment holds the outsider"
    );
    echo(&tb, &client).expect("the foreign exclusion lets client-a out uncaptured");
    assert!(
        refused(echo_to(&tb, &client, WATCH_PORT)),
        "fail closed elsewhere"
    );
    assert!(
        !plaintext_echoed(&tb, &outsider, app),
        "the corrupt mode drops plaintext"
    );

    tb.start_agent("node1", &options(&ca, "node1"))
        .expect("the agent starts and is ready");
    assert_logged(
        &log_since_last_start(&tb),
        &[
            "removed stale enrolment",
            "rewrote a corrupt enrolment entry",
            "removed an excluded port no --exclude-port asks for",
            "removed stale inbound capture entry",
            "undecodable key [1, 2, 3, 4] family 7",
            "rewrote the inbound mode of an address",
        ],
    );
    assert_pinned_exactly(&tb, &[&client, &server], &[&client, &server]);
    echo_to(&tb, &outsider, WATCH_PORT).expect("the outsider connects directly again");
    assert_carried(&tb, &client);
    assert!(plaintext_echoed(&tb, &outsider, app), "PERMISSIVE again");
    assert!(tb.agent_running("node1"));
}
