//! A tunnel ends as the TCP connection it carries does (RFC 9113 §8.5): a client that resets
//! its connection is seen by the server as a reset, carried as RST_STREAM(CONNECT_ERROR), and
//! an orderly close as an orderly close. Before, a reset reached the server as a FIN: the
//! destination proxy's delivery socket closed first and left a TIME_WAIT in the server's pod
//! for every connection, 20,000 of them in the bench's short-lived run, and new connections
//! slowed down searching past them (docs/benchmarks.md).

use nodemesh_testbed::time_wait_sockets;

use super::*;

/// TCP sockets in TIME_WAIT in the network namespace `netns`.
fn time_wait(netns: &str) -> usize {
    time_wait_sockets(netns).expect("ss")
}

/// Connections from client-a that `node`'s inbound side has seen closed.
fn closed_from_client_a(tb: &Testbed, node: &str) -> u64 {
    from_client_a(&tb.admin_json(node, "/stats").expect("stats"), "closed")
}

#[test]
fn a_client_reset_reaches_the_server_as_a_reset_and_leaves_no_time_wait() {
    const CONNECTIONS: u64 = 200;
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let workload = mesh.tb.workload_bin().display().to_string();
    let client = mesh.tb.pod("mesh", "client-a").clone();
    // Same node (client-a and server-a on node1) and across nodes (server-b on node2).
    for (server, node) in [("server-a", "node1"), ("server-b", "node2")] {
        let server = mesh.tb.pod("mesh", server).clone();
        mesh.tb
            .start_echo_server(&server, 7000)
            .expect("echo server");
        let target = format!("{}:7000", server.ipv4());
        let mut closed = closed_from_client_a(&mesh.tb, node);
        for (close, time_wait_expected) in [("rst", false), ("normal", true)] {
            // The client's pod may hold TIME_WAIT sockets of its own orderly closes before.
            let in_client_before = time_wait(client.netns());
            let out = run(
                &mesh.tb,
                "mesh",
                "client-a",
                &workload,
                &[
                    "connect-loop",
                    "--target",
                    &target,
                    "--count",
                    &CONNECTIONS.to_string(),
                    "--echo-bytes",
                    "64",
                    "--close",
                    close,
                ],
            );
            assert!(
                out.status.success(),
                "{close}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The connections went through the destination's inbound side (the mesh carried
            // them: over HBONE to node2, handed over in process on node1), and it has
            // finished each of them.
            wait_until(
                scaled(Duration::from_secs(20)),
                "the destination's side to close every tunnel",
                || Ok(closed_from_client_a(&mesh.tb, node) == closed + CONNECTIONS),
            )
            .unwrap_or_else(|e| panic!("{close} to {target}: {e}"));
            closed += CONNECTIONS;
            let in_server = time_wait(server.netns());
            if time_wait_expected {
                // The control: an orderly close leaves the delivery socket, which closed
                // first, in TIME_WAIT, as the client's own would be without the mesh. So the
                // count sees the sockets a lost reset would leave.
                assert!(
                    in_server >= CONNECTIONS as usize,
                    "{target}: {in_server} TIME_WAIT sockets after {CONNECTIONS} orderly closes"
                );
            } else {
                assert_eq!(
                    in_server, 0,
                    "{target}: a client's reset left TIME_WAIT sockets in the server's pod"
                );
                assert!(
                    time_wait(client.netns()) <= in_client_before,
                    "{target}: a reset left TIME_WAIT sockets in the client's pod"
                );
            }
        }
    }
}
