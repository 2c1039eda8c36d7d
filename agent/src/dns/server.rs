//! The DNS listener of one pod: UDP on the pod's loopback (`127.0.0.1` and `::1`, the DNS
//! port), carrying the proxy's mark so that the kernel programs steer the pod's queries to
//! it and to nothing else bound there. Each query is answered from the cluster state
//! (`answer.rs`) or forwarded, from inside the pod's network namespace, to the resolver the
//! pod addressed (which the programs record), and the answer relayed unchanged. A resolver
//! that does not answer within the forward timeout (`--dns-forward-timeout-ms`) gets the pod
//! a SERVFAIL, never a hang. Queries in flight count as connections for the drain, so a
//! stopping agent sends their answers before it exits.
//!
//! In an upgrade the predecessor hands its sockets over with its listeners (`handoff`): the
//! successor reads them once it has taken over, and the predecessor stops reading then but
//! still sends the answers it has in flight, so no query is lost. A predecessor that does
//! not hand them over keeps the port until it exits: binding is retried until it is free,
//! and meanwhile the predecessor answers.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::rr::Name;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::UdpSocket, sync::Semaphore};

use super::answer::{self, Decision, ServiceNames};
use crate::{
    datapath::Datapath, lifecycle::drain::Drain, netns::NetnsSockets,
    state::services::SharedServices, telemetry::metrics::Metrics,
};

/// Queries of one pod in flight at once; more are dropped (the client retries).
const IN_FLIGHT: usize = 64;
/// The largest DNS message over UDP (EDNS allows up to 64 KiB; resolvers send ≤ 4 KiB).
const MAX_MESSAGE: usize = 65_535;
/// How often binding is retried while the port is taken.
const BIND_RETRY: Duration = Duration::from_millis(200);

/// What every pod's DNS listener shares.
pub struct DnsContext {
    pub port: u16,
    pub domain: Name,
    /// How long the pod's resolver may take to answer a forwarded query.
    pub forward_timeout: Duration,
    /// The agent's drain: queries in flight are tracked like connections.
    pub drain: Drain,
    pub proxy_mark: u32,
    pub datapath: Arc<Datapath>,
    pub services: SharedServices,
    pub metrics: Arc<Metrics>,
}

struct Names<'a>(&'a crate::state::services::ServiceIndex);

impl ServiceNames for Names<'_> {
    fn addresses(&self, namespace: &str, name: &str) -> Option<Vec<IpAddr>> {
        self.0.dns_addresses(&format!("{namespace}/{name}"))
    }

    fn hostname_addresses(
        &self,
        namespace: &str,
        service: &str,
        host: &str,
    ) -> Option<Vec<IpAddr>> {
        (self.0).dns_hostname_addresses(&format!("{namespace}/{service}"), host)
    }
}

/// The pod's DNS listener addresses: `127.0.0.1` and `::1` at the DNS port.
pub fn listen_addresses(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
}

/// Serves the DNS of the pod `pod` (its network namespace in `sockets`) until the task is
/// dropped, on the sockets given (opened or handed over), binding the missing IPv4 one when
/// the port is free.
pub async fn serve_pod(
    pod: String,
    sockets: Arc<NetnsSockets>,
    ctx: Arc<DnsContext>,
    [v4, v6]: [Option<std::net::UdpSocket>; 2],
) {
    let [addr4, _] = listen_addresses(ctx.port);
    let listener4 = match v4.map(UdpSocket::from_std) {
        Some(Ok(socket)) => Arc::new(socket),
        Some(Err(error)) => {
            tracing::warn!(pod, %error, "DNS listener unusable; opening another");
            bind_when_free(&pod, &sockets, addr4, ctx.proxy_mark).await
        }
        None => bind_when_free(&pod, &sockets, addr4, ctx.proxy_mark).await,
    };
    // A pod without IPv6 has no ::1; its IPv6 queries fail anyway.
    let listener6 = v6.and_then(|s| UdpSocket::from_std(s).ok()).map(Arc::new);
    tracing::info!(pod, port = ctx.port, "DNS listener serving");
    let limit = Arc::new(Semaphore::new(IN_FLIGHT));
    let serve6 = async {
        match &listener6 {
            Some(listener) => receive(listener, &sockets, &ctx, &limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::join!(receive(&listener4, &sockets, &ctx, &limit), serve6);
}

async fn bind_when_free(
    pod: &str,
    sockets: &NetnsSockets,
    addr: SocketAddr,
    mark: u32,
) -> Arc<UdpSocket> {
    let mut said = false;
    loop {
        match bind(sockets, addr, mark).and_then(UdpSocket::from_std) {
            Ok(socket) => return Arc::new(socket),
            Err(error) => {
                if !said {
                    tracing::warn!(pod, %addr, %error, "DNS listener cannot bind yet; retrying");
                    said = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    }
}

/// A DNS listener socket at `addr` in the pod, with the proxy's mark (nonblocking).
pub fn bind(
    sockets: &NetnsSockets,
    addr: SocketAddr,
    mark: u32,
) -> io::Result<std::net::UdpSocket> {
    let socket = udp_socket(sockets, addr)?;
    socket.set_mark(mark)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn udp_socket(sockets: &NetnsSockets, addr: SocketAddr) -> io::Result<Socket> {
    sockets
        .run_inside(|| {
            Socket::new(
                Domain::for_address(addr),
                Type::DGRAM.nonblocking(),
                Some(Protocol::UDP),
            )
        })
        .map_err(io::Error::other)?
}

async fn receive(
    listener: &Arc<UdpSocket>,
    sockets: &Arc<NetnsSockets>,
    ctx: &Arc<DnsContext>,
    limit: &Arc<Semaphore>,
) {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, client) = match listener.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(%error, "DNS listener receive failed");
                tokio::time::sleep(BIND_RETRY).await;
                continue;
            }
        };
        let query = buffer[..len].to_vec();
        let Ok(permit) = Arc::clone(limit).try_acquire_owned() else {
            ctx.metrics
                .dns_query(&answer::query_type(&query), "dropped");
            continue;
        };
        let (listener, sockets, ctx) = (Arc::clone(listener), Arc::clone(sockets), Arc::clone(ctx));
        let drain = ctx.drain.clone();
        tokio::spawn(drain.tracked(async move {
            let _permit = permit;
            if let Some(reply) = handle(&query, &sockets, &ctx).await {
                let _ = listener.send_to(&reply, client).await;
            }
        }));
    }
}

/// The answer to `query`, if there is one to send.
async fn handle(query: &[u8], sockets: &NetnsSockets, ctx: &DnsContext) -> Option<Vec<u8>> {
    let query_type = answer::query_type(query);
    let decision = {
        let services = ctx.services.read().unwrap_or_else(|p| p.into_inner());
        answer::decide(query, &Names(&services), &ctx.domain)
    };
    match decision {
        Decision::Answer { message, outcome } => {
            ctx.metrics.dns_query(&query_type, outcome.label());
            Some(message)
        }
        Decision::Drop => {
            ctx.metrics.dns_query(&query_type, "malformed");
            None
        }
        Decision::Forward => {
            let resolver = ctx.datapath.dns_resolver(sockets.cookie());
            let started = Instant::now();
            let forwarded = match resolver {
                Some(resolver) => forward(sockets, resolver, query, ctx.forward_timeout).await,
                None => Err(io::Error::other("no resolver recorded for the pod")),
            };
            match forwarded {
                Ok(reply) => {
                    ctx.metrics.dns_forwarded(started.elapsed());
                    ctx.metrics.dns_query(&query_type, "forwarded");
                    Some(reply)
                }
                Err(error) => {
                    tracing::warn!(
                        resolver = ?resolver,
                        %error,
                        "forwarding a DNS query failed; answering SERVFAIL"
                    );
                    ctx.metrics.dns_query(&query_type, "failed");
                    answer::server_failure(query)
                }
            }
        }
    }
}

/// Sends `query` to `resolver` from the pod's network namespace and returns its answer (the
/// first datagram from it with the query's ID).
async fn forward(
    sockets: &NetnsSockets,
    resolver: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let socket = udp_socket(sockets, resolver)?;
    let local: SocketAddr = if resolver.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&local.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(resolver).await?;
    socket.send(query).await?;
    let id = query.get(..2).unwrap_or_default().to_vec();
    let mut buffer = vec![0u8; MAX_MESSAGE];
    tokio::time::timeout(timeout, async {
        loop {
            let len = socket.recv(&mut buffer).await?;
            if buffer.get(..2) == Some(id.as_slice()) {
                return Ok(buffer[..len].to_vec());
            }
        }
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
    })?
}
