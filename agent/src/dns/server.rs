//! The DNS listener of one pod: UDP on the pod's loopback (`127.0.0.1` and `::1`, the DNS
//! port), carrying the proxy's mark so that the kernel programs steer the pod's queries to
//! it and to nothing else bound there. Each query is answered from the cluster state
//! (`answer.rs`) or forwarded, from inside the pod's network namespace, to the resolver the
//! pod addressed (which the programs record), and the answer relayed unchanged. A resolver
//! that does not answer within [`FORWARD_TIMEOUT`] gets the pod a SERVFAIL, never a hang.
//!
//! The port may still be held by the agent this one succeeds (an upgrade): binding is
//! retried until it is free; meanwhile the predecessor answers.

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
    datapath::Datapath, netns::NetnsSockets, state::services::SharedServices,
    telemetry::metrics::Metrics,
};

/// How long the pod's resolver may take to answer a forwarded query.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
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
}

/// Serves the DNS of the pod `pod` (its network namespace in `sockets`) until the task is
/// dropped.
pub async fn serve_pod(pod: String, sockets: Arc<NetnsSockets>, ctx: Arc<DnsContext>) {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, ctx.port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, ctx.port));
    let listener4 = bind_when_free(&pod, &sockets, v4, ctx.proxy_mark).await;
    // A pod without IPv6 has no ::1; its IPv6 queries fail anyway.
    let listener6 = match bind(&sockets, v6, ctx.proxy_mark) {
        Ok(socket) => Some(Arc::new(socket)),
        Err(error) => {
            tracing::debug!(pod, %error, "no IPv6 DNS listener");
            None
        }
    };
    tracing::info!(pod, port = ctx.port, "DNS listener open");
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
        match bind(sockets, addr, mark) {
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

fn bind(sockets: &NetnsSockets, addr: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let socket = udp_socket(sockets, addr)?;
    socket.set_mark(mark)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
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
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = handle(&query, &sockets, &ctx).await {
                let _ = listener.send_to(&reply, client).await;
            }
        });
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
                Some(resolver) => forward(sockets, resolver, query).await,
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
    tokio::time::timeout(FORWARD_TIMEOUT, async {
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
            format!("no answer within {FORWARD_TIMEOUT:?}"),
        )
    })?
}
