//! The mesh under load while its parts fail or change: agent upgrades and restarts
//! (docs/lifecycle.md), `kill -9`, and the CA down for longer than a certificate's life
//! (docs/security.md). A soak runs in
//! client-a (node1) against server-b (node2), through the mesh with mTLS: short connections
//! back to back, each a 64-byte echo; long-lived connections that exchange 1 KiB every 50 ms
//! and must end with a clean close; and keep-alive HTTP/1.1 requests back to back to a
//! Service (the L7 proxy, with pooled upstream connections in HBONE tunnels). Needs root.

use std::{process::Command, thread, time::Duration};

use nix::sys::signal::Signal;
use nodemesh_testbed::{AgentOptions, MeshCa, Testbed, cluster_state, is_root, wait_until};
use serde_json::Value;

const SOAK_MS: u64 = 12_000;
const LONG_LIVED: usize = 4;
/// The Service in front of server-b's HTTP server.
const WEB: &str = "198.18.200.30";
const HTTP_PORT: u16 = 8080;

fn meshed(prefix: &str) -> (Testbed, MeshCa) {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let (tb, ca) = Testbed::create_meshed(prefix, 3600).expect("meshed testbed");
    let server = tb.pod("mesh", "server-b").clone();
    tb.start_echo_server(&server, 7000).expect("echo server");
    tb.start_http_server(&server, HTTP_PORT)
        .expect("HTTP server");
    let service = cluster_state::service_object("mesh", "web", WEB, 80, "http");
    tb.apply_object("service-web.yaml", &service)
        .expect("service");
    let slice = cluster_state::endpoint_slice_object("web", "http", HTTP_PORT, &[(&server, false)]);
    tb.apply_object("endpointslice-web.yaml", &slice)
        .expect("endpoint slice");
    wait_until(Duration::from_secs(10), "node1 to know the Service", || {
        let dump = tb.admin_json("node1", "/config_dump")?;
        Ok(!Testbed::workload_services(&dump).is_empty())
    })
    .expect("service known");
    (tb, ca)
}

fn options(ca: &MeshCa, node: &str) -> AgentOptions {
    AgentOptions {
        extra_args: ca.agent_args(node),
        ..Default::default()
    }
}

/// Connections a node's agent has accepted so far (all sources and destinations).
fn opened(tb: &Testbed, node: &str) -> nodemesh_testbed::Result<u64> {
    let stats = tb.admin_json(node, "/stats")?;
    Ok(stats["connections"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .map(|s| s["opened"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0))
}

/// Runs the soak in client-a on a thread (with HTTP requests to the Service when `http`);
/// `during` runs meanwhile, once traffic flows through node1's agent. Returns the soak's
/// summary.
fn soak_while(tb: &Testbed, http: bool, during: impl FnOnce()) -> Value {
    let client = tb.pod("mesh", "client-a").clone();
    let server = tb.pod("mesh", "server-b").clone();
    let target = format!("{}:7000", server.ipv4());
    let before = opened(tb, "node1").expect("stats");
    // The soak runs at least SOAK_MS, and on until `during` is done, however long that takes
    // on a loaded machine.
    let done = tb.log_dir().join("soak-done");
    let output = thread::scope(|scope| {
        let soak = scope.spawn(|| {
            let mut command = Command::new(tb.workload_bin());
            command.args([
                "soak",
                "--target",
                &target,
                "--long-lived",
                &LONG_LIVED.to_string(),
                "--duration-ms",
                &SOAK_MS.to_string(),
            ]);
            command.arg("--until-file").arg(&done);
            if http {
                command.args(["--http-target", &format!("{WEB}:80")]);
            }
            tb.run_in_pod_timeout(&client, command, Duration::from_secs(300))
                .expect("soak")
        });
        wait_until(
            Duration::from_secs(10),
            "traffic through node1's agent",
            || Ok(opened(tb, "node1")? >= before + 20),
        )
        .expect("soak started");
        {
            // Ends the soak when `during` is done, and also when it panics.
            let _end = EndSoak(&done);
            during();
        }
        soak.join().expect("soak thread")
    });
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "soak output: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    eprintln!("soak: {summary}");
    summary
}

/// Creates the file the soak waits for when dropped.
struct EndSoak<'a>(&'a std::path::Path);

impl Drop for EndSoak<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, b"");
    }
}

/// Nothing failed, and every long-lived connection kept exchanging for the whole soak and
/// then closed cleanly (the soak checks the close): none was reset by the restart.
fn assert_nothing_dropped(summary: &Value) {
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["long_lived_failed"], 0, "{summary}");
    let each = summary["long_lived_exchanges_each"]
        .as_array()
        .expect("each");
    assert_eq!(each.len(), LONG_LIVED, "{summary}");
    // 12 s at one exchange per 50 ms plus its round trip: well over 100 for a connection
    // that never stalled.
    assert!(
        each.iter().all(|n| n.as_u64().unwrap_or(0) >= 100),
        "every long-lived connection kept exchanging: {summary}"
    );
}

#[test]
fn an_upgrade_with_overlap_drops_no_connection_on_either_side() {
    let (tb, ca) = meshed("nmup");
    let summary = soak_while(&tb, true, || {
        // The destination's node first (HBONE clients move to the successor on GOAWAY),
        // then the source's (the pods' outbound listeners change hands).
        for node in ["node2", "node1"] {
            let served_before = opened(&tb, node).expect("stats");
            tb.start_successor_agent(node, &options(&ca, node))
                .expect("successor ready");
            // As the DaemonSet controller does once the new pod is ready.
            tb.signal_previous_agent(node, Signal::SIGTERM)
                .expect("SIGTERM the previous agent");
            wait_until(
                Duration::from_secs(10),
                &format!("the successor on {node} serving new connections"),
                || Ok(opened(&tb, node)? > 10),
            )
            .unwrap_or_else(|e| panic!("{e}; before the upgrade it had served {served_before}"));
        }
    });
    assert_nothing_dropped(&summary);
    assert_eq!(summary["http_failed"], 0, "{summary}");
    assert!(
        summary["http_requests"].as_u64().unwrap_or(0) >= 500,
        "HTTP requests flowed the whole time: {summary}"
    );
    for node in ["node1", "node2"] {
        // The previous agent served its long-lived connections to their end, then exited.
        let status = tb
            .wait_previous_agent(node, Duration::from_secs(30))
            .expect("the previous agent exits once its connections are done");
        assert!(
            status.success(),
            "{node}: previous agent exited with {status}"
        );
        let log = tb.agent_log(node);
        for needle in [
            "handed the in-pod listeners to a successor",
            "took over from the previous agent",
            "a successor took over",
            "all connections finished",
        ] {
            assert!(
                log.contains(needle),
                "{node} agent log lacks {needle:?}:\n{log}"
            );
        }
        assert!(
            !log.contains("drain grace period over"),
            "{node}: connections were cut at the end of the grace period:\n{log}"
        );
    }
}

#[test]
fn a_stop_without_successor_drains_its_connections_and_fails_open_meanwhile() {
    let (tb, ca) = meshed("nmstop");
    // No HTTP to the Service here: in the gap its connects go out untouched (fail open), and
    // the testbed has no kube-proxy to route a Service address; pod addresses work.
    let summary = soak_while(&tb, false, || {
        // A plain stop (a pod deleted without surge): SIGTERM, and only later a new agent.
        tb.retire_agent("node1").expect("retire");
        tb.signal_previous_agent("node1", Signal::SIGTERM)
            .expect("SIGTERM the agent");
        wait_until(
            Duration::from_secs(5),
            "the stopped agent to close its listeners",
            || Ok(tb.agent_log("node1").contains("agent stopping")),
        )
        .expect("stopping");
        // New connections meanwhile follow --fail-mode open: straight to server-b, whose
        // namespace is PERMISSIVE, so they still succeed.
        tb.start_agent("node1", &options(&ca, "node1"))
            .expect("a new agent while the old one drains");
        wait_until(
            Duration::from_secs(10),
            "the new agent serving new connections",
            || Ok(opened(&tb, "node1")? > 10),
        )
        .expect("new agent serving");
    });
    assert_nothing_dropped(&summary);
    let status = tb
        .wait_previous_agent("node1", Duration::from_secs(30))
        .expect("the stopped agent exits once its connections are done");
    assert!(status.success(), "stopped agent exited with {status}");
    let log = tb.agent_log("node1");
    for needle in [
        "agent stopping; capture stays attached",
        "all connections finished",
    ] {
        assert!(log.contains(needle), "agent log lacks {needle:?}:\n{log}");
    }
}

/// `kill -9` under load, in both fail modes. There is no drain without a process: what the
/// agent carried is reset (by design, docs/lifecycle.md); new connections follow the fail
/// mode until a new agent runs.
fn kill_9_under_load(prefix: &str, fail_mode: &str) -> Value {
    let (tb, ca) = meshed(prefix);
    let options = AgentOptions {
        fail_mode: fail_mode.to_owned(),
        ..options(&ca, "node1")
    };
    tb.kill_agent("node1", Signal::SIGKILL).expect("stop");
    tb.start_agent("node1", &options)
        .expect("agent with the fail mode");
    soak_while(&tb, false, || {
        tb.kill_agent("node1", Signal::SIGKILL).expect("kill -9");
        // The soak goes on without an agent while the new one starts (a few hundred ms).
        tb.start_agent("node1", &options).expect("a new agent");
        wait_until(Duration::from_secs(10), "the new agent serving", || {
            Ok(opened(&tb, "node1")? > 10)
        })
        .expect("new agent serving");
    })
}

#[test]
fn kill_9_under_load_resets_what_the_agent_carried_and_fails_open_meanwhile() {
    let summary = kill_9_under_load("nmkillo", "open");
    // The long-lived connections were the killed agent's: reset, by design.
    assert_eq!(summary["long_lived_failed"], LONG_LIVED, "{summary}");
    // Short connections run one at a time: only those cut at the kill fail (the one in
    // flight, and one that reached the dying listener), closed or reset, never hung (counted
    // over every attempt, not only the errors quoted); after them, connections go direct
    // until the new agent serves them.
    assert!(
        summary["short_failed"].as_u64().unwrap_or(99) <= 3,
        "{summary}"
    );
    assert_eq!(short_failures(&summary, "timed_out"), 0, "{summary}");
}

/// How many short connections of the soak failed with this kind of failure (all of them are
/// counted, whatever the summary quotes).
fn short_failures(summary: &Value, kind: &str) -> u64 {
    summary["short_failure_kinds"][kind].as_u64().unwrap_or(0)
}

/// The soak's short connections' outcomes in order, as runs of one kind: (kind, count).
fn short_outcome_runs(summary: &Value) -> Vec<(String, u64)> {
    serde_json::from_value(summary["short_outcomes"].clone())
        .unwrap_or_else(|e| panic!("short_outcomes: {e}: {summary}"))
}

#[test]
fn kill_9_under_load_refuses_new_connections_at_once_when_failing_closed() {
    let summary = kill_9_under_load("nmkillc", "closed");
    assert_eq!(summary["long_lived_failed"], LONG_LIVED, "{summary}");
    // Without an agent, connect() fails at once with EPERM (never a hang): the soak counts
    // those until the new agent serves.
    let failed = summary["short_failed"].as_u64().unwrap_or(0);
    assert!(
        failed >= 1,
        "connects were refused while no agent ran: {summary}"
    );
    // The connections in flight at the kill (and a connect that met the dying listener)
    // are reset; every later failure, over all the soak's attempts, is a refusal with EPERM.
    let failures: Vec<(String, u64)> = short_outcome_runs(&summary)
        .into_iter()
        .filter(|(kind, _)| kind != "ok")
        .collect();
    let first_refusal = failures
        .iter()
        .position(|(kind, _)| kind == "eperm")
        .unwrap_or_else(|| panic!("no connect was refused with EPERM: {summary}"));
    let at_kill: u64 = failures[..first_refusal].iter().map(|(_, n)| n).sum();
    assert!(
        at_kill <= 3
            && failures[first_refusal..]
                .iter()
                .all(|(kind, _)| kind == "eperm"),
        "after the connections cut at the kill, every failure is an EPERM refusal: {summary}"
    );
    assert_eq!(
        short_failures(&summary, "eperm") + at_kill,
        failed,
        "{summary}"
    );
}

#[test]
fn a_ca_outage_past_certificate_expiry_stops_new_mesh_connections_until_it_returns() {
    // 4 s certificates: renewal is due at 2.8 s and expiry at 4 s.
    let (tb, mut ca) = {
        assert!(
            is_root(),
            "kernel tests need root: run `cargo xtask test` as root"
        );
        let (tb, ca) = Testbed::create_meshed("nmcaout", 4).expect("meshed testbed");
        let server = tb.pod("mesh", "server-b").clone();
        tb.start_echo_server(&server, 7000).expect("echo server");
        (tb, ca)
    };
    let ready = |node: &str| -> nodemesh_testbed::Result<bool> {
        Ok(tb.admin_get(node, "/readyz")?.0 == 200)
    };
    let summary = soak_while(&tb, false, || {
        ca.stop().expect("CA down");
        // Renewals fail; once the certificates expire both agents say they are not ready.
        wait_until(Duration::from_secs(10), "certificates to expire", || {
            Ok(!ready("node1")? && !ready("node2")?)
        })
        .expect("expired");
        let log = tb.agent_log("node1");
        assert!(log.contains("certificate request failed"), "{log}");
        // New mesh connections are refused at once meanwhile (no plaintext fallback); the
        // soak counts them. The CA comes back:
        tb.restart_ca(&mut ca).expect("CA back");
        wait_until(Duration::from_secs(20), "renewal after the outage", || {
            Ok(ready("node1")? && ready("node2")?)
        })
        .expect("renewed");
    });
    // By design (docs/security.md): connections established before expiry keep their TLS
    // session and run on; new ones fail fast while no valid certificate is held, and work
    // again after renewal. None hangs (the soak would report a timeout).
    assert_eq!(summary["long_lived_failed"], 0, "{summary}");
    assert!(
        summary["short_failed"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
    assert_eq!(
        short_failures(&summary, "timed_out"),
        0,
        "failures are immediate: {summary}"
    );
    let log = tb.agent_log("node1");
    assert!(
        log.contains("holds no valid certificate"),
        "the refusal names the cause: {log}"
    );
    // After the soak, new connections work again.
    let client = tb.pod("mesh", "client-a").clone();
    let mut again = Command::new(tb.workload_bin());
    again
        .args(["connect-many", "--target-ip"])
        .arg(tb.pod("mesh", "server-b").ipv4().to_string())
        .args(["--ports", "7000", "--connections", "20"]);
    let output = tb.run_in_pod(&client, again).expect("after the outage");
    assert!(
        output.status.success(),
        "after renewal: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Waits until node1's agent has opened `more` connections beyond `from`: traffic flowed.
fn traffic_flowed(tb: &Testbed, from: u64, more: u64, what: &str) {
    wait_until(Duration::from_secs(10), what, || {
        Ok(opened(tb, "node1")? >= from + more)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Applies a Service `name` (no endpoints) and waits until node1's agent lists it.
fn agent_learns_service(tb: &Testbed, name: &str, ip: &str) {
    let service = cluster_state::service_object("mesh", name, ip, 80, "http");
    tb.apply_object(&format!("service-{name}.yaml"), &service)
        .expect("service");
    wait_until(
        Duration::from_secs(30),
        &format!("node1 to learn {name}"),
        || {
            let dump = tb.admin_json("node1", "/config_dump")?;
            Ok(Testbed::workload_services(&dump)
                .iter()
                .any(|s| s["service"] == format!("mesh/{name}")))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The real API server, then etcd behind it, stopped and restarted while the soak runs: the
/// agents keep serving with the state they have (ready throughout, no connection lost),
/// reconnect by themselves, and a change made after each restart reaches them.
#[test]
fn api_server_and_etcd_restarts_under_traffic_lose_nothing_and_the_agents_catch_up() {
    let (tb, _ca) = meshed("nmcp");
    let summary = soak_while(&tb, true, || {
        let api = tb.api().expect("a real API server");
        api.stop_api_server().expect("stop the API server");
        let at_stop = opened(&tb, "node1").expect("stats");
        traffic_flowed(&tb, at_stop, 50, "traffic while the API server is down");
        for node in ["node1", "node2"] {
            let (status, _) = tb.admin_get(node, "/readyz").expect("readyz");
            assert_eq!(status, 200, "{node} stays ready on its last state");
        }
        api.start_api_server().expect("the API server back");
        agent_learns_service(&tb, "after-apiserver", "198.18.200.31");

        api.stop_etcd().expect("stop etcd");
        let at_stop = opened(&tb, "node1").expect("stats");
        traffic_flowed(&tb, at_stop, 50, "traffic while etcd is down");
        api.start_etcd().expect("etcd back");
        api.wait_ready().expect("the API server serving again");
        agent_learns_service(&tb, "after-etcd", "198.18.200.32");
    });
    assert_nothing_dropped(&summary);
    assert_eq!(summary["http_failed"], 0, "{summary}");
    for node in ["node1", "node2"] {
        assert!(tb.agent_running(node), "{node}'s agent never exited");
    }
}
