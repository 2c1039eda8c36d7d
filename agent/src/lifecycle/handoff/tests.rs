use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd, OwnedFd},
};

use super::*;

/// A socket path in a directory of its own that does not exist yet (the agent makes it);
/// the directory goes with the returned guard.
fn unique_address() -> (tempfile::TempDir, HandoffAddress) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let address = scratch
        .path()
        .join("nodemesh/handoff.sock")
        .to_str()
        .expect("UTF-8")
        .parse()
        .expect("valid path");
    (scratch, address)
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn name(addr: SocketAddr) -> ListenerName {
    ListenerName {
        pod_uid: "uid-1".to_owned(),
        netns_inode: 42,
        role: ListenerRole::Outbound,
        addr,
    }
}

/// Plays the agent's main loop: answers Hello with `listener`, TakeOver with 7.
fn main_loop(
    mut events: mpsc::Receiver<Event>,
    listener: OwnedFd,
    addr: SocketAddr,
) -> Vec<&'static str> {
    let mut seen = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Hello(reply) => {
                seen.push("hello");
                let fd = listener.as_fd().try_clone_to_owned().expect("dup");
                let _ = reply.send(vec![HandedListener {
                    name: name(addr),
                    fd,
                }]);
            }
            Event::TakeOver(reply) => {
                seen.push("take_over");
                let _ = reply.send(7);
                break;
            }
            Event::Abandoned => seen.push("abandoned"),
        }
    }
    seen
}

/// An agent serving `address` with one listener (returned with its address); its main loop
/// runs on a thread whose result is the events it saw.
fn agent_serving(
    address: &HandoffAddress,
) -> (SocketAddr, std::thread::JoinHandle<Vec<&'static str>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (events_tx, events) = mpsc::channel(4);
    serve(address, events_tx).expect("serve");
    let fd = OwnedFd::from(listener);
    (
        addr,
        std::thread::spawn(move || main_loop(events, fd, addr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_gets_the_same_listening_socket_and_takes_over() {
    let (_scratch, address) = unique_address();
    let (addr, agent) = agent_serving(&address);
    // Only the agent's user can reach the socket: its directory and the file are its own.
    assert_eq!(mode_of(address.directory()), 0o700);
    assert_eq!(mode_of(&address.0), 0o600);

    // A second agent cannot serve the same name while the first does.
    let (other, _) = mpsc::channel(1);
    assert!(matches!(
        serve(&address, other),
        Err(HandoffError::Served { .. })
    ));

    let (predecessor, listeners) = inherit(&address).expect("inherit").expect("a predecessor");
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].name, name(addr));
    // The very socket: a connection made to the original address is accepted from it.
    let inherited = TcpListener::from(listeners.into_iter().next().expect("one").fd);
    assert_eq!(inherited.local_addr().expect("addr"), addr);
    let mut client = TcpStream::connect(addr).expect("connect");
    let (mut accepted, _) = inherited.accept().expect("accept");
    client.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");

    assert_eq!(predecessor.take_over().expect("take over"), 7);
    // The probe of the second `serve` above was no successor: it never reached the main loop.
    assert_eq!(agent.join().expect("main loop"), vec!["hello", "take_over"]);
    // The name is free for the successor to serve its own successor.
    let (next, _) = mpsc::channel(1);
    serve(&address, next).expect("the successor serves the name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_leaves_before_taking_over_changes_nothing() {
    let (_scratch, address) = unique_address();
    let (_, agent) = agent_serving(&address);

    let (predecessor, listeners) = inherit(&address).expect("inherit").expect("a predecessor");
    drop((predecessor, listeners));
    // The agent still serves: a second successor gets the listener again and takes over.
    let (predecessor, listeners) = inherit(&address).expect("inherit").expect("a predecessor");
    assert_eq!(listeners.len(), 1);
    assert_eq!(predecessor.take_over().expect("take over"), 7);
    assert_eq!(
        agent.join().expect("main loop"),
        vec!["hello", "abandoned", "hello", "take_over"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_to_inherit_when_no_agent_serves_the_name() {
    let (_scratch, address) = unique_address();
    assert!(inherit(&address).expect("no error").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_of_another_protocol_version_is_refused_with_the_reason() {
    let (_scratch, address) = unique_address();
    let (events_tx, _events) = mpsc::channel(4);
    serve(&address, events_tx).expect("serve");
    let connection = seqpacket(&address).expect("socket");
    socket::connect(connection.as_raw_fd(), &address.unix_addr().expect("addr")).expect("connect");
    send(
        &address,
        &connection,
        &Message::Hello {
            version: 99,
            dns: true,
        },
        None,
    )
    .expect("send");
    match receive(&address, &connection).expect("answer") {
        (Message::Refused { reason }, None) => {
            assert!(reason.contains("version 99"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_sockets_go_only_to_a_successor_that_takes_them() {
    let (_scratch, address) = unique_address();
    let (events_tx, mut events) = mpsc::channel(4);
    serve(&address, events_tx).expect("serve");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    std::thread::spawn(move || {
        while let Some(event) = events.blocking_recv() {
            if let Event::Hello(reply) = event {
                let handed = [ListenerRole::Outbound, ListenerRole::Dns].map(|role| {
                    let fd = socket.as_fd().try_clone_to_owned().expect("dup");
                    let name = ListenerName { role, ..name(addr) };
                    HandedListener { name, fd }
                });
                let _ = reply.send(handed.into());
            }
        }
    });
    // This version's successor gets both.
    let (_, listeners) = inherit(&address).expect("inherit").expect("a predecessor");
    let roles: Vec<ListenerRole> = listeners.iter().map(|l| l.name.role).collect();
    assert_eq!(roles, [ListenerRole::Outbound, ListenerRole::Dns]);
    // An agent that predates DNS handoff says hello without `dns` and would not know the
    // role: it gets the listeners only.
    let old_hello: Message = serde_json::from_str(r#"{"type":"hello","version":1}"#).expect("json");
    let connection = seqpacket(&address).expect("socket");
    socket::connect(connection.as_raw_fd(), &address.unix_addr().expect("addr")).expect("connect");
    send(&address, &connection, &old_hello, None).expect("send");
    let mut roles = Vec::new();
    loop {
        match receive(&address, &connection).expect("message") {
            (Message::Listener { name }, Some(_)) => roles.push(name.role),
            (Message::End { listeners }, _) => {
                assert_eq!(listeners, roles.len());
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(roles, [ListenerRole::Outbound]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_left_by_an_agent_that_is_gone_is_replaced() {
    let (_scratch, address) = unique_address();
    {
        let (events_tx, _events) = mpsc::channel(4);
        serve(&address, events_tx).expect("serve").abort();
    }
    // The aborted server's socket file stays behind, and nobody answers on it.
    wait_for(|| {
        let probe = seqpacket(&address).expect("socket");
        socket::connect(probe.as_raw_fd(), &address.unix_addr().expect("addr"))
            == Err(Errno::ECONNREFUSED)
    });
    let (events_tx, _events) = mpsc::channel(4);
    serve(&address, events_tx).expect("a new agent serves the path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_directory_is_refused_by_both_ends() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("shared");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let address: HandoffAddress = dir
        .join("handoff.sock")
        .to_str()
        .expect("UTF-8")
        .parse()
        .expect("path");
    let (events_tx, _events) = mpsc::channel(4);
    assert!(matches!(
        serve(&address, events_tx),
        Err(HandoffError::Directory(
            DirectoryError::WritableByOthers { .. }
        ))
    ));
    assert!(matches!(
        inherit(&address),
        Err(HandoffError::Directory(
            DirectoryError::WritableByOthers { .. }
        ))
    ));
}

fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn handoff_addresses_are_checked() {
    assert!("".parse::<HandoffAddress>().is_err());
    assert!(
        "@nodemesh/handoff".parse::<HandoffAddress>().is_err(),
        "no abstract names"
    );
    assert!(
        "handoff.sock".parse::<HandoffAddress>().is_err(),
        "absolute only"
    );
    assert!("/".parse::<HandoffAddress>().is_err());
    assert!(
        format!("/run/{}", "x".repeat(120))
            .parse::<HandoffAddress>()
            .is_err()
    );
    let address: HandoffAddress = "/run/nodemesh/handoff.sock".parse().expect("valid");
    assert_eq!(address.directory(), Path::new("/run/nodemesh"));
}
