//! The bounds on real sockets on loopback, with clients from several loopback addresses (the
//! whole of 127.0.0.0/8 is local), against a plain HTTP server and a TLS one.

use std::time::Instant;

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

use super::*;
use crate::identity::tls;

const QUICK: Duration = Duration::from_millis(300);

fn limits(per_source: usize, total: usize) -> Limits {
    Limits {
        max_connections: total,
        max_connections_per_source: per_source,
        handshake_timeout: QUICK,
        header_read_timeout: QUICK,
        max_lifetime: Duration::from_secs(30),
    }
}

async fn start(limits: Limits, tls: Option<TlsAcceptor>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = BoundedServer::new("test", limits, tls);
    tokio::spawn(server.serve(listener, |_peer| {
        service_fn(|_request| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        })
    }));
    addr
}

async fn try_connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("address"))?;
    socket.connect(to).await
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    try_connect_from(source, to).await.expect("connect")
}

/// Whether a new connection from `source` is refused: reset at once (which may come before
/// `connect` has returned).
async fn refused(source: &str, to: SocketAddr) -> bool {
    match try_connect_from(source, to).await {
        Err(_) => true,
        Ok(mut stream) => closed_within(&mut stream, QUICK).await,
    }
}

/// Whether the server closes (or resets) the connection within `within`, whatever it sends
/// first.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buffer = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_still_open) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// One GET on `stream`; the response's status code.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> u16 {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("a response in time")
            .expect("read");
        assert_eq!(n, 1, "closed before the response: {head:?}");
        head.push(byte[0]);
    }
    let mut body = [0u8; 2];
    stream.read_exact(&mut body).await.expect("body");
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line")
}

#[tokio::test]
async fn each_source_gets_its_share_and_the_server_its_total() {
    let addr = start(
        Limits {
            header_read_timeout: Duration::from_secs(30),
            ..limits(2, 3)
        },
        None,
    )
    .await;
    let mut a1 = connect_from("127.0.0.2", addr).await;
    let mut a2 = connect_from("127.0.0.2", addr).await;
    assert!(refused("127.0.0.2", addr).await, "over the source's share");
    assert!(!closed_within(&mut a1, QUICK).await && !closed_within(&mut a2, QUICK).await);
    let mut b1 = connect_from("127.0.0.3", addr).await;
    assert!(refused("127.0.0.3", addr).await, "over the total");
    assert!(!closed_within(&mut b1, QUICK).await);
    assert_eq!(get(&mut b1).await, 200);

    // A slot comes back when its connection ends.
    drop(a1);
    let started = Instant::now();
    while refused("127.0.0.3", addr).await {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no slot came back"
        );
    }
}

#[tokio::test]
async fn idle_and_slow_clients_are_closed_at_the_header_timeout_and_others_are_served() {
    let addr = start(limits(8, 8), None).await;
    let started = Instant::now();
    let mut idle = connect_from("127.0.0.2", addr).await;
    let mut slow = connect_from("127.0.0.2", addr).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: te")
        .await
        .expect("half a head");
    let mut kept_alive = connect_from("127.0.0.2", addr).await;
    assert_eq!(get(&mut kept_alive).await, 200, "served meanwhile");
    for stream in [&mut idle, &mut slow, &mut kept_alive] {
        assert!(closed_within(stream, Duration::from_secs(3)).await);
    }
    assert!(
        started.elapsed() >= QUICK - Duration::from_millis(50),
        "closed by the timeout, not at once: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn tls_handshakes_not_completed_in_time_are_closed() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let server = tls::ca_server_config(
        &certified.cert.pem(),
        &certified.signing_key.serialize_pem(),
    )
    .expect("server config");
    let addr = start(limits(8, 8), Some(TlsAcceptor::from(Arc::new(server)))).await;

    let started = Instant::now();
    let mut silent = connect_from("127.0.0.2", addr).await;
    let mut stalled = connect_from("127.0.0.2", addr).await;
    // A TLS record header announcing a ClientHello, and then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("partial hello");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("root");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        tls::ca_client_config(roots).expect("client config"),
    ));
    let tcp = connect_from("127.0.0.3", addr).await;
    let mut client = connector
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("a prompt client completes its handshake");
    assert_eq!(get(&mut client).await, 200);

    for stream in [&mut silent, &mut stalled] {
        assert!(closed_within(stream, Duration::from_secs(3)).await);
    }
    assert!(started.elapsed() >= QUICK - Duration::from_millis(50));
}

#[tokio::test]
async fn a_connection_ends_at_its_lifetime() {
    let addr = start(
        Limits {
            header_read_timeout: Duration::from_secs(30),
            max_lifetime: QUICK,
            ..limits(8, 8)
        },
        None,
    )
    .await;
    let mut client = connect_from("127.0.0.2", addr).await;
    assert_eq!(get(&mut client).await, 200);
    assert!(closed_within(&mut client, Duration::from_secs(3)).await);
}
