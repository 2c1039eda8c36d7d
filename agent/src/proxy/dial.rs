//! The proxy's outgoing sockets: created inside a pod's network namespace (so they leave
//! with the pod's address and routes), marked, without Nagle, and connected with a deadline.

use std::{net::SocketAddr, time::Duration};

use socket2::{Domain, Socket};
use tokio::{
    net::{TcpSocket, TcpStream},
    time::error::Elapsed,
};

use crate::netns::{NetnsError, NetnsSockets};

/// A TCP socket in the pod for connecting to `target`, carrying `mark`.
pub fn pod_socket(
    sockets: &NetnsSockets,
    target: SocketAddr,
    mark: u32,
) -> Result<Socket, NetnsError> {
    let socket = sockets.tcp_socket(Domain::for_address(target))?;
    socket.set_mark(mark).map_err(NetnsError::Socket)?;
    // The proxy forwards what it reads at once; Nagle would only add delay.
    socket.set_tcp_nodelay(true).map_err(NetnsError::Socket)?;
    Ok(socket)
}

/// Connects `socket` to `target`, giving up after `timeout` (the outer error).
pub async fn connect_within(
    socket: Socket,
    target: SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<TcpStream>, Elapsed> {
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    tokio::time::timeout(timeout, socket.connect(target)).await
}
