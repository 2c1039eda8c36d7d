//! The accept loop every in-pod listener of the proxy runs, and the addresses it accepts.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use crate::lifecycle::drain::Drain;

/// Accepts connections until the task running it is dropped, handing each to `handle` in a
/// task of its own, tracked until it ends (a draining agent waits for it). `what` and `pod`
/// name the listener in logs.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    pod: &str,
    drain: &Drain,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(drain.tracked(handle(stream, peer)));
            }
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(pod, listener = what, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// IPv4 peers can appear v4-mapped on IPv6 sockets.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
