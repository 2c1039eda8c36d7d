//! The last hop of inbound traffic: connecting to the application from inside its pod.

use std::{io, net::SocketAddr, time::Duration};

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};

use crate::pods::netns::NetnsSockets;

/// Connects to `target` (an address of the pod) from a socket in the pod's network namespace,
/// marked as the proxy's so the connect hook leaves it alone.
pub async fn connect_to_application(
    sockets: &NetnsSockets,
    proxy_mark: u32,
    connect_timeout: Duration,
    target: SocketAddr,
) -> io::Result<TcpStream> {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = sockets.tcp_socket(domain).map_err(io::Error::other)?;
    socket.set_mark(proxy_mark)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    tokio::time::timeout(connect_timeout, socket.connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}
