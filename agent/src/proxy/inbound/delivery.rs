//! The last hop of inbound traffic: connecting to the application from inside its pod.
//!
//! HBONE traffic is delivered with the client pod's address as the source when the pod's
//! policy routing allows it (`pods::routing`): a transparent socket bound to that address,
//! listed in `NM_DELIVERIES` while it connects so the inbound program does not capture it.
//! Plaintext (PERMISSIVE) is delivered from the pod's own address: a transparent socket
//! would share the 4-tuple space of the client's own connections to the same port, and the
//! kernel cannot detect the clash (see docs/hbone.md).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use socket2::Socket;
use tokio::net::TcpStream;

use super::context::{DestinationPod, InboundContext};
use crate::{
    datapath::Datapath,
    proxy::{
        dial::{connect_within, pod_socket},
        listener::canonical,
    },
};

/// Connects to `target` (an address of the pod), from `client` when given and possible.
/// Returns the stream and whether the client's address was kept.
pub async fn connect_to_application(
    pod: &DestinationPod,
    ctx: &InboundContext,
    target: SocketAddr,
    client: Option<IpAddr>,
) -> io::Result<(TcpStream, bool)> {
    let client = client
        .map(canonical)
        .filter(|ip| ip.is_ipv4() == target.is_ipv4() && pod.source_preservation.covers(*ip));
    if let Some(client) = client {
        match connect_transparent(pod, ctx, target, client).await {
            Ok(stream) => return Ok((stream, true)),
            Err(error) if error.kind() == io::ErrorKind::TimedOut => return Err(error),
            Err(error) => {
                tracing::debug!(pod = %pod.display_name, %client, %error, "delivering from the pod's own address instead")
            }
        }
    }
    let socket = new_socket(pod, ctx.proxy_mark, target)?;
    Ok((connect(socket, target, ctx).await?, false))
}

async fn connect_transparent(
    pod: &DestinationPod,
    ctx: &InboundContext,
    target: SocketAddr,
    client: IpAddr,
) -> io::Result<TcpStream> {
    let socket = new_socket(pod, ctx.transparent_mark, target)?;
    set_transparent(&socket, client)?;
    socket.bind(&SocketAddr::new(client, 0).into())?;
    let source = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    ctx.datapath
        .begin_delivery(source)
        .map_err(io::Error::other)?;
    let _entry = DeliveryEntry {
        datapath: &ctx.datapath,
        source,
    };
    connect(socket, target, ctx).await
}

/// The delivery entry of `source` while its connect is in flight: removed when this is
/// dropped, also when the connect's future is (the client left, a timeout above it fired),
/// since an entry left behind would let that address and port through the inbound hook.
struct DeliveryEntry<'a> {
    datapath: &'a Datapath,
    source: SocketAddr,
}

impl Drop for DeliveryEntry<'_> {
    fn drop(&mut self) {
        self.datapath.end_delivery(self.source);
    }
}

fn new_socket(pod: &DestinationPod, mark: u32, target: SocketAddr) -> io::Result<Socket> {
    pod_socket(&pod.sockets, target, mark).map_err(io::Error::other)
}

async fn connect(
    socket: Socket,
    target: SocketAddr,
    ctx: &InboundContext,
) -> io::Result<TcpStream> {
    connect_within(socket, target, ctx.connect_timeout)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// IP_TRANSPARENT / IPV6_TRANSPARENT: lets the socket bind an address that is not local.
fn set_transparent(socket: &Socket, addr: IpAddr) -> io::Result<()> {
    let (level, option) = match addr {
        IpAddr::V4(_) => (libc::SOL_IP, libc::IP_TRANSPARENT),
        IpAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
