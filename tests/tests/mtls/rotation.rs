//! Certificates rotate under load without failing a connection.

use super::*;

/// A certificate an agent held, as its config dump showed it.
#[derive(Debug, PartialEq)]
struct Held {
    serial: String,
    not_after_unix: u64,
}

fn held(identity: &Value) -> Option<Held> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let chain = identity["certificate_chain"].as_str()?;
    let leaf = CertificateDer::from_pem_slice(chain.as_bytes()).ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(Held {
        serial: parsed.raw_serial_as_string(),
        not_after_unix: identity["not_after_unix"].as_u64()?,
    })
}

/// What a sampler saw while traffic ran: every certificate each identity held, in order,
/// and for every HBONE connection from client-a (by local address) the client certificate
/// generation (index into client-a's certificates) current when it was first seen.
#[derive(Debug, Default)]
struct Observed {
    certificates: BTreeMap<String, Vec<Held>>,
    hbone_connections: BTreeMap<String, usize>,
}

impl Observed {
    fn sample(&mut self, tb: &Testbed, client_netns: &str, client_id: &str, hbone: &str) {
        // Connections first, then certificates: a connection seen here was made with a
        // certificate no newer than the one the dump below shows.
        let ss = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{client_netns}"))
            .args(["ss", "-Htn", "state", "established", "dst", hbone])
            .output()
            .expect("ss (iproute2)");
        let connections: Vec<String> = String::from_utf8_lossy(&ss.stdout)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let peer = fields.iter().position(|f| *f == hbone)?;
                Some(fields.get(peer.checked_sub(1)?)?.to_string())
            })
            .collect();
        for node in ["node1", "node2"] {
            let Ok(dump) = tb.admin_json(node, "/config_dump") else {
                continue;
            };
            for (id, identity) in identities_in(&dump) {
                let Some(now) = held(&identity) else { continue };
                let seen = self.certificates.entry(id).or_default();
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
            }
        }
        let generation = self
            .certificates
            .get(client_id)
            .map_or(0, |c| c.len().saturating_sub(1));
        for connection in connections {
            self.hbone_connections
                .entry(connection)
                .or_insert(generation);
        }
    }
}

#[test]
fn certificates_rotate_under_load_without_failing_a_connection() {
    // 4 s certificates renew every 2.8 s: 12 s of traffic spans at least 3 renewals of every
    // identity on both sides.
    let mesh = mesh_with_ca(4);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    let client_a = mesh.tb.pod("mesh", "client-a").clone();
    mesh.tb
        .start_echo_server(&server_b, 7000)
        .expect("echo server");
    let renewals = |node: &str, id: &str| {
        identities(&mesh.tb, node)[id]["renewals"]
            .as_u64()
            .expect("renewals")
    };
    let client_id = "spiffe://cluster.local/ns/mesh/sa/client-a";
    let server_id = "spiffe://cluster.local/ns/mesh/sa/server-b";
    let before = (renewals("node1", client_id), renewals("node2", server_id));

    let target = format!("{}:7000", server_b.ipv4());
    let hbone = format!("{}:15008", server_b.ipv4());
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let (soak, observed) = std::thread::scope(|scope| {
        let (tb, netns, hbone) = (&mesh.tb, client_a.netns(), &hbone);
        let sampler = scope.spawn(move || {
            let mut observed = Observed::default();
            // Every 100 ms until the soak is over (the sender is dropped).
            loop {
                observed.sample(tb, netns, client_id, hbone);
                match finished.recv_timeout(Duration::from_millis(100)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return observed,
                }
            }
        });
        let soak = run(
            &mesh.tb,
            "mesh",
            "client-a",
            mesh.tb.workload_bin().to_str().unwrap(),
            &[
                "soak",
                "--target",
                &target,
                "--long-lived",
                "4",
                "--duration-ms",
                "12000",
            ],
        );
        drop(done);
        (soak, sampler.join().expect("sampler"))
    });
    let summary: Value = serde_json::from_slice(&soak.stdout).unwrap_or_else(|_| {
        panic!(
            "soak output: {} {}",
            String::from_utf8_lossy(&soak.stdout),
            String::from_utf8_lossy(&soak.stderr)
        )
    });
    eprintln!("soak under rotation: {summary}");
    assert!(soak.status.success(), "failures under rotation: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["peer_mismatch"], 0, "{summary}");
    // About 8 short connections a second natively (100 over the run); an emulated kernel
    // (the VM matrix) runs slower by the time scale, and still crosses every renewal.
    let time_scale = scaled(Duration::from_secs(1)).as_secs_f64();
    let enough = (100.0 / time_scale) as u64;
    assert!(
        summary["short_connections"].as_u64().unwrap() >= enough,
        "enough short connections to cross every renewal: {summary}"
    );
    // Each long-lived connection exchanged (and checked) 1 KiB about every 50 ms for the
    // whole run, then closed cleanly: it outlived every certificate it started with.
    let each = summary["long_lived_exchanges_each"].as_array().unwrap();
    assert_eq!(each.len(), 4, "{summary}");
    assert!(
        each.iter().all(|n| n.as_u64().unwrap() >= enough),
        "every long-lived connection kept exchanging: {summary}"
    );

    // The rotation really happened during the traffic: each side held at least 4 distinct
    // certificates (3 changes of serial and expiry) while the sampler watched.
    eprintln!("certificates seen: {:#?}", observed.certificates);
    for id in [client_id, server_id] {
        let seen = &observed.certificates[id];
        assert!(
            seen.len() >= 4,
            "{id} changed certificate at least 3 times during the run: {seen:?}"
        );
        assert!(
            seen.windows(2)
                .all(|w| w[0].serial != w[1].serial && w[0].not_after_unix < w[1].not_after_unix),
            "each renewal brought a new serial and a later expiry: {seen:?}"
        );
    }
    // New streams used the renewed certificates: client-a's pool opened a new HBONE
    // connection under each certificate generation after the first.
    eprintln!(
        "HBONE connections (local address → client certificate generation): {:?}",
        observed.hbone_connections
    );
    let generations: std::collections::BTreeSet<usize> =
        observed.hbone_connections.values().copied().collect();
    assert!(
        generations.iter().filter(|g| **g > 0).count() >= 3,
        "client-a opened HBONE connections with at least 3 renewed certificates: {:?}",
        observed.hbone_connections
    );
    let after = (renewals("node1", client_id), renewals("node2", server_id));
    eprintln!("renewals (client-a, server-b): {before:?} -> {after:?}");
    assert!(
        after.0 >= before.0 + 3 && after.1 >= before.1 + 3,
        "both sides renewed at least 3 times during the run: {before:?} -> {after:?}"
    );
}
