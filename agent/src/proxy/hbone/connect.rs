//! What an HBONE CONNECT names: the destination's `ip:port` as its `:authority`.

use std::net::SocketAddr;

/// The `ip:port` a CONNECT names (HBONE's `:authority`); None for anything else (a host
/// name, a missing port, a path).
pub fn connect_target(uri: &hyper::Uri) -> Option<SocketAddr> {
    if uri
        .path_and_query()
        .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return None;
    }
    uri.authority()?.as_str().parse().ok()
}
