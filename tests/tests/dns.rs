//! DNS on the node proxy, with real clients and a real resolver: `dig` and the C library
//! (`getent`, with a pod's resolv.conf and ndots:5) in a meshed pod are answered for
//! cluster names (a Service, a headless Service, a StatefulSet pod's hostname) by the agent, through the kernel programs that steer UDP port 53 to its
//! listener in the pod, with the answer coming from the resolver's address; everything else
//! goes on to the pod's resolver (dnsmasq in a pod outside the mesh), whose query log shows
//! what reached it. Queries in flight through an agent upgrade are answered: the DNS sockets
//! are handed over and the old agent drains its queries. Controls: a pod outside the mesh and a pod that opts out reach the
//! resolver directly. With no agent, fail open sends queries to the resolver and fail
//! closed refuses them at once. Needs root.

use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use nodemesh::cli::prometheus;
use nodemesh_testbed::{
    AgentOptions, Pod, PodSpec, Signal, Testbed, TestbedConfig, TopologySpec, cluster_state,
    is_root, scaled, wait_until,
};

const WEB: &str = "198.18.200.40";
/// What the resolver answers for `example.test`.
const EXAMPLE: &str = "192.0.2.7";
const SEARCH: &str = "search mesh.svc.cluster.local svc.cluster.local cluster.local";

struct Dns {
    tb: Testbed,
    /// The resolver: dnsmasq in plain/outsider.
    resolver: String,
    query_log: PathBuf,
}

/// node1 runs client-a (meshed), server-a (meshed, opts its DNS out) and plain/outsider,
/// where dnsmasq answers `example.test`; Service `web` has a ClusterIP, Service `db` is
/// headless with server-b behind it.
fn setup(prefix: &str, fail_mode: &str) -> Dns {
    setup_with(prefix, &options(fail_mode, &[]))
}

/// The agents' options: DNS capture on port 15053, and `extra`.
fn options(fail_mode: &str, extra: &[&str]) -> AgentOptions {
    let mut extra_args = vec!["--dns-port".to_owned(), "15053".to_owned()];
    extra_args.extend(extra.iter().map(|a| (*a).to_owned()));
    AgentOptions {
        fail_mode: fail_mode.to_owned(),
        extra_args,
        ..Default::default()
    }
}

fn setup_with(prefix: &str, options: &AgentOptions) -> Dns {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let config = TestbedConfig::from_workspace(prefix).expect("config");
    let mut topology = TopologySpec::standard();
    topology.nodes[0].pods[1] =
        PodSpec::new("mesh", "server-a").with_label("nodemesh.io/dns", "disabled");
    let tb = Testbed::create(config, topology).expect("testbed");
    let outsider = tb.pod("plain", "outsider").clone();
    let resolver = outsider.ipv4().to_string();
    let query_log = tb.log_dir().join("dnsmasq-queries.log");
    let example = format!("--address=/example.test/{EXAMPLE}");
    tb.start_dnsmasq(&outsider, &query_log, &[&example])
        .expect("dnsmasq");
    for node in ["node1", "node2"] {
        tb.start_agent(node, options).expect("agent");
    }
    let web = cluster_state::service_object("mesh", "web", WEB, 80, "http");
    tb.apply_object("service-web.yaml", &web).expect("web");
    let mut db = cluster_state::service_object("mesh", "db", "None", 5432, "postgres");
    if let Some(spec) = db.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
    }
    tb.apply_object("service-db.yaml", &db).expect("db");
    let server_b = tb.pod("mesh", "server-b").clone();
    let mut slice =
        cluster_state::endpoint_slice_object("db", "postgres", 5432, &[(&server_b, false)]);
    // server-b is pod db-0 of a StatefulSet behind the headless Service.
    for endpoint in slice.endpoints.iter_mut().flatten() {
        endpoint.hostname = Some("db-0".into());
    }
    tb.apply_object("endpointslice-db.yaml", &slice)
        .expect("slice");
    wait_until(scaled(Duration::from_secs(10)), "Services loaded", || {
        let dump = tb.admin_json("node1", "/config_dump")?;
        Ok(dump["cluster_state"]["services"].as_u64() >= Some(2))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    Dns {
        tb,
        resolver,
        query_log,
    }
}

impl Dns {
    /// `dig` in `pod` asking the resolver for `name`: its whole output.
    fn dig(&self, pod: &Pod, name: &str) -> String {
        let mut dig = Command::new("dig");
        dig.args([
            &format!("@{}", self.resolver),
            name,
            "A",
            "+tries=1",
            "+time=3",
            "+nocookie",
        ]);
        let output = self.tb.run_in_pod(pod, dig).expect("dig");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// The C library's lookup of `name` in `pod`, with a pod's resolv.conf (the resolver,
    /// the namespace's search path, ndots:5) bound over /etc/resolv.conf in a mount
    /// namespace of its own.
    fn getent(&self, pod: &Pod, name: &str) -> String {
        let resolv = self
            .tb
            .log_dir()
            .join(format!("resolv-{}.conf", pod.name()));
        std::fs::write(
            &resolv,
            format!(
                "nameserver {}\n{SEARCH}\noptions ndots:5 attempts:1 timeout:3\n",
                self.resolver
            ),
        )
        .expect("resolv.conf");
        let mut getent = Command::new("unshare");
        getent.args([
            "--mount",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /etc/resolv.conf && getent ahostsv4 {name}",
                resolv.display()
            ),
        ]);
        let output = self.tb.run_in_pod(pod, getent).expect("getent");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A query for `name` sent with `sendto` on an unconnected UDP socket (the path `dig`
    /// and the C library, which connect, do not take), the answer read with `recvfrom`:
    /// prints the address it came from and the answer's first A record.
    fn sendto(&self, pod: &Pod, name: &str) -> String {
        let mut ask = Command::new(self.tb.workload_bin());
        ask.args(["dns-ask", "--resolver", &self.resolver, "--name", name]);
        let output = self.tb.run_in_pod(pod, ask).expect("dns-ask");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// The names dnsmasq was asked for, in order.
    fn resolver_saw(&self) -> Vec<String> {
        std::fs::read_to_string(&self.query_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                line.split_once("query[")?
                    .1
                    .split_once("] ")?
                    .1
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    }

    /// node1's count of DNS queries with `outcome`.
    fn queries(&self, outcome: &str) -> f64 {
        let (_, text) = self.tb.admin_get("node1", "/metrics").expect("metrics");
        prometheus::parse(&text)
            .iter()
            .filter(|s| {
                s.name == "nodemesh_dns_queries_total" && s.has_labels(&[("outcome", outcome)])
            })
            .map(|s| s.value)
            .sum()
    }
}

fn answer_line(dig: &str) -> Option<String> {
    dig.lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .nth(1)
        .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
}

#[test]
fn cluster_names_are_answered_in_the_pod_and_the_rest_goes_to_its_resolver() {
    let dns = setup("nmdns", "open");
    let tb = &dns.tb;
    let client = tb.pod("mesh", "client-a").clone();
    let outsider = tb.pod("plain", "outsider").clone();

    // The control: outside the mesh the resolver gets the query (and knows no such name).
    let direct = dns.dig(&outsider, "web.mesh.svc.cluster.local");
    assert!(
        direct.contains("status: NXDOMAIN") || direct.contains("status: REFUSED"),
        "{direct}"
    );
    assert_eq!(dns.resolver_saw(), ["web.mesh.svc.cluster.local"]);
    assert_eq!(dns.queries("local"), 0.0);

    // A meshed pod: the agent answers, as the resolver's address; the resolver never sees it.
    let local = dns.dig(&client, "web.mesh.svc.cluster.local");
    assert_eq!(answer_line(&local).as_deref(), Some(WEB), "{local}");
    assert!(
        local.contains(&format!("SERVER: {}#53", dns.resolver)),
        "{local}"
    );
    assert!(!local.contains("unexpected source"), "{local}");
    assert_eq!(dns.queries("local"), 1.0);
    // The same with sendto/recvfrom: the answer's source is the resolver's address.
    let unconnected = dns.sendto(&client, "web.mesh.svc.cluster.local");
    assert_eq!(
        unconnected.trim(),
        format!("{} 53 {WEB}", dns.resolver),
        "{unconnected}"
    );
    let headless = dns.dig(&client, "db.mesh.svc.cluster.local");
    let server_b = tb.pod("mesh", "server-b").ipv4().to_string();
    assert_eq!(
        answer_line(&headless).as_ref(),
        Some(&server_b),
        "{headless}"
    );
    let member = dns.dig(&client, "db-0.db.mesh.svc.cluster.local");
    assert_eq!(answer_line(&member), Some(server_b), "{member}");
    let missing = dns.dig(&client, "nosuch.mesh.svc.cluster.local");
    assert!(missing.contains("status: NXDOMAIN"), "{missing}");
    assert!(
        missing.contains("flags: qr aa rd ra"),
        "authoritative: {missing}"
    );
    assert_eq!(dns.resolver_saw().len(), 1, "{:?}", dns.resolver_saw());

    // Anything else is forwarded from the pod to its resolver, and the answer relayed.
    let external = dns.dig(&client, "example.test");
    assert_eq!(
        answer_line(&external).as_deref(),
        Some(EXAMPLE),
        "{external}"
    );
    assert_eq!(
        dns.resolver_saw().last().map(String::as_str),
        Some("example.test")
    );
    assert_eq!(dns.queries("forwarded"), 1.0);
    let log = std::fs::read_to_string(&dns.query_log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("example.test from") && l.contains(&client.ipv4().to_string())),
        "forwarded from the pod's own address: {log}"
    );

    // The C library with the search path and ndots:5: `web` is one local answer; the
    // search path's misses for `example.test` are denied here, so the resolver sees only
    // the name itself.
    let before = dns.resolver_saw().len();
    assert!(dns.getent(&client, "web").starts_with(WEB), "getent web");
    assert!(dns.getent(&client, "example.test").starts_with(EXAMPLE));
    assert_eq!(
        dns.resolver_saw()[before..],
        ["example.test"],
        "{:?}",
        dns.resolver_saw()
    );

    // A pod that opts out goes to the resolver itself.
    let opted_out = tb.pod("mesh", "server-a").clone();
    let asked = dns.resolver_saw().len();
    let answer = dns.dig(&opted_out, "web.mesh.svc.cluster.local");
    assert!(!answer.contains(WEB), "{answer}");
    assert_eq!(dns.resolver_saw().len(), asked + 1);
    let dump = tb.admin_json("node1", "/config_dump").expect("dump");
    let capture: BTreeMap<String, bool> = dump["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_owned(),
                p["dns_capture"] == true,
            )
        })
        .collect();
    assert_eq!(capture.get("client-a"), Some(&true), "{dump}");
    assert_eq!(capture.get("server-a"), Some(&false), "{dump}");
}

#[test]
fn with_no_agent_dns_fails_open_to_the_resolver() {
    let dns = setup("nmdnsopen", "open");
    let client = dns.tb.pod("mesh", "client-a").clone();
    // The precondition: captured.
    let local = dns.dig(&client, "web.mesh.svc.cluster.local");
    assert_eq!(answer_line(&local).as_deref(), Some(WEB), "{local}");
    dns.tb.kill_agent("node1", Signal::SIGKILL).expect("kill");
    let asked = dns.resolver_saw().len();
    let direct = dns.dig(&client, "example.test");
    assert_eq!(answer_line(&direct).as_deref(), Some(EXAMPLE), "{direct}");
    assert_eq!(dns.resolver_saw().len(), asked + 1);
}

#[test]
fn with_no_agent_dns_fails_closed_at_once() {
    let dns = setup("nmdnsclosed", "closed");
    let client = dns.tb.pod("mesh", "client-a").clone();
    // The resolver answers (so that its silence below means something).
    let outsider = dns.tb.pod("plain", "outsider").clone();
    let direct = dns.dig(&outsider, "example.test");
    assert_eq!(answer_line(&direct).as_deref(), Some(EXAMPLE), "{direct}");
    let local = dns.dig(&client, "web.mesh.svc.cluster.local");
    assert_eq!(answer_line(&local).as_deref(), Some(WEB), "{local}");
    dns.tb.kill_agent("node1", Signal::SIGKILL).expect("kill");
    let asked = dns.resolver_saw().len();
    // EPERM from the kernel program, not a timeout.
    let refused = dns.dig(&client, "example.test");
    assert!(
        refused.contains("ermission denied") || refused.contains("not permitted"),
        "{refused}"
    );
    assert!(!refused.contains("timed out"), "{refused}");
    assert_eq!(dns.resolver_saw().len(), asked);
}

#[test]
fn queries_in_flight_through_an_agent_upgrade_are_answered() {
    // Forwarded queries may wait 10 s here, so that the upgrade happens while they do.
    let options = options("open", &["--dns-forward-timeout-ms", "10000"]);
    let dns = setup_with("nmdnsup", &options);
    let tb = &dns.tb;
    let client = tb.pod("mesh", "client-a").clone();
    let resolver_pod = tb.pod("mesh", "server-b").clone();
    let resolver = resolver_pod.ipv4().to_string();
    let log = tb.log_dir().join("held-resolver.log");
    let release = tb.log_dir().join("held-resolver.release");
    // A resolver that holds every query until `release` exists.
    let mut held = Command::new(tb.workload_bin());
    held.args(["dns-held", "--answer", "192.0.2.9", "--log"])
        .arg(&log)
        .arg("--release")
        .arg(&release);
    tb.spawn_in_pod(&resolver_pod, held)
        .expect("resolver")
        .detach();
    let logged = |line: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l == line)
    };
    wait_until(scaled(Duration::from_secs(5)), "the resolver", || {
        Ok(logged("ready"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let dig = |name: &str| {
        let mut dig = Command::new("dig");
        dig.args([
            &format!("@{resolver}"),
            name,
            "A",
            "+tries=1",
            "+time=15",
            "+noedns",
        ]);
        dig.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        tb.spawn_in_pod(&client, dig).expect("dig")
    };

    // A query the old agent forwarded, held by the resolver while the successor takes over.
    let first = dig("first.test");
    wait_until(scaled(Duration::from_secs(5)), "first forwarded", || {
        Ok(logged("got first.test"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    tb.start_successor_agent("node1", &options)
        .expect("successor");
    let agent_log = tb.agent_log("node1");
    assert!(
        agent_log
            .lines()
            .any(|l| l.contains("a successor took over") && l.contains("connections=1")),
        "the old agent counts the query in flight as a connection to drain:\n{agent_log}"
    );
    // A query after the takeover: the successor reads the socket it was handed.
    let second = dig("second.test");
    wait_until(scaled(Duration::from_secs(5)), "second forwarded", || {
        Ok(logged("got second.test"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // SIGTERM to the old agent with its query in flight: it waits for the answer.
    tb.signal_previous_agent("node1", Signal::SIGTERM)
        .expect("SIGTERM");
    std::fs::write(&release, "").expect("release");
    for (name, dig) in [("first.test", first), ("second.test", second)] {
        let output = dig
            .wait_with_output(scaled(Duration::from_secs(20)))
            .expect("dig");
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            answer_line(&text).as_deref(),
            Some("192.0.2.9"),
            "{name}: {text}"
        );
    }
    let status = tb
        .wait_previous_agent("node1", scaled(Duration::from_secs(15)))
        .expect("the old agent exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        dns.queries("forwarded"),
        1.0,
        "the successor forwarded the second"
    );
    let local = dns.dig(&client, "web.mesh.svc.cluster.local");
    assert_eq!(answer_line(&local).as_deref(), Some(WEB), "{local}");
}
