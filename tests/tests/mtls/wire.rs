//! HBONE on the wire: meshed traffic crosses between nodes only inside mTLS (a packet
//! capture shows it), byte-exact over IPv4 and IPv6 with the dialled peer.

use super::*;

/// tcpdump on node1's port of the bridge between the nodes (a bridge device itself does not
/// see the frames it forwards between ports).
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(tb: &Testbed, dir: &Path) -> Capture {
        let file = dir.join("wire.pcap");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-br", tb.name()),
                "tcpdump",
                "-i",
                "n1",
                // Hand each packet over at once: without it packets wait in the kernel's
                // ring-buffer block, and stopping tcpdump drops them.
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
            ])
            .arg(&file)
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (installed by scripts/setup.sh)");
        // tcpdump says "listening on n1" once it captures: wait for that line.
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let listening = lines
            .by_ref()
            .take(5)
            .map_while(Result::ok)
            .any(|line| line.contains("listening on"));
        assert!(listening, "tcpdump did not start");
        Capture { child, file }
    }

    /// Stops the capture and returns the raw bytes captured.
    fn finish(mut self) -> Vec<u8> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("pcap written")
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn traffic_between_meshed_pods_is_encrypted_on_the_wire_and_delivered() {
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    mesh.tb
        .start_http_server(&server_b, 8080)
        .expect("http server");

    let capture = Capture::start(&mesh.tb, mesh.ca.dir());
    let secret = "NODEMESH-SECRET-MARKER-7f3a";
    let url = format!("http://{}:8080/{secret}", server_b.ipv4());
    let meshed = run(
        &mesh.tb,
        "mesh",
        "client-a",
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &url],
    );
    assert_eq!(
        String::from_utf8_lossy(&meshed.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&meshed.stderr)
    );
    let in_the_clear = "NODEMESH-PLAINTEXT-MARKER-91c2";
    let url = format!("http://{}:8080/{in_the_clear}", server_b.ipv4());
    let plain = run(
        &mesh.tb,
        "plain",
        "outsider",
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &url],
    );
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "200");
    let wire = capture.finish();

    assert!(
        contains(&wire, in_the_clear),
        "the capture sees plaintext of non-meshed traffic (sanity check of the capture; {} bytes captured)",
        wire.len()
    );
    assert!(
        !contains(&wire, secret),
        "meshed traffic crossed the wire in the clear"
    );

    // node2's HBONE server saw the connection from client-a's verified identity.
    let stats = mesh.tb.admin_json("node2", "/stats").expect("stats");
    let inbound: Vec<&Value> = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["source_pod"] == "spiffe://cluster.local/ns/mesh/sa/client-a")
        .collect();
    assert_eq!(inbound.len(), 1, "{stats}");
    assert_eq!(
        inbound[0]["destination"],
        format!("{}:8080", server_b.ipv4())
    );
}

#[test]
fn hbone_carries_ipv4_and_ipv6_byte_exact_with_the_dialled_peer() {
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    mesh.tb
        .start_echo_server(&server_b, 7000)
        .expect("echo server");
    let workload = mesh.tb.workload_bin().display().to_string();
    for target in [
        format!("{}:7000", server_b.ipv4()),
        format!("[{}]:7000", server_b.ipv6()),
    ] {
        let out = run(
            &mesh.tb,
            "mesh",
            "client-a",
            &workload,
            &[
                "echo-client",
                "--target",
                &target,
                "--bytes",
                "262144",
                "--connections",
                "5",
            ],
        );
        assert!(
            out.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // node2 counts a connection's bytes as they pass and its close when both directions have
    // finished, which can be a moment after the client saw its echo: wait for the 10 closes.
    let mut stats = Value::Null;
    wait_until(
        Duration::from_secs(10),
        "node2 to count the 10 connections closed",
        || {
            stats = mesh.tb.admin_json("node2", "/stats")?;
            Ok(from_client_a(&stats, "closed") == 10)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {stats}"));
    assert_eq!(
        from_client_a(&stats, "bytes_sent"),
        10 * 262144,
        "all 10 connections delivered through node2's HBONE server: {stats}"
    );
}
