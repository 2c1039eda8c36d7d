use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd, OwnedFd},
};

use super::*;

fn unique_address(test: &str) -> HandoffAddress {
    format!("@nodemesh-test/{test}/{}", std::process::id())
        .parse()
        .expect("valid name")
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
    let address = unique_address("take-over");
    let (addr, agent) = agent_serving(&address);

    // A second agent cannot serve the same name while the first does.
    let (other, _) = mpsc::channel(1);
    assert!(matches!(
        serve(&address, other),
        Err(HandoffError::Socket {
            action: "binding",
            ..
        })
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
    assert_eq!(agent.join().expect("main loop"), vec!["hello", "take_over"]);
    // The name is free for the successor to serve its own successor.
    let (next, _) = mpsc::channel(1);
    serve(&address, next).expect("the successor serves the name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_leaves_before_taking_over_changes_nothing() {
    let address = unique_address("abandon");
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
    let address = unique_address("nobody");
    assert!(inherit(&address).expect("no error").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_of_another_protocol_version_is_refused_with_the_reason() {
    let address = unique_address("version");
    let (events_tx, _events) = mpsc::channel(4);
    serve(&address, events_tx).expect("serve");
    let connection = seqpacket(&address).expect("socket");
    socket::connect(connection.as_raw_fd(), &address.unix_addr().expect("addr")).expect("connect");
    send(&address, &connection, &Message::Hello { version: 99 }, None).expect("send");
    match receive(&address, &connection).expect("answer") {
        (Message::Refused { reason }, None) => {
            assert!(reason.contains("version 99"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn handoff_addresses_are_checked() {
    assert!("@".parse::<HandoffAddress>().is_err());
    assert!("".parse::<HandoffAddress>().is_err());
    assert!(
        format!("@{}", "x".repeat(120))
            .parse::<HandoffAddress>()
            .is_err()
    );
    assert!(
        "/run/nodemesh/handoff.sock"
            .parse::<HandoffAddress>()
            .is_ok()
    );
}
