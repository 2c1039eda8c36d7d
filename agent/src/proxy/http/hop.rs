//! Hop-by-hop headers (RFC 9110 §7.6.1) and protocol upgrades, for both sides of the proxy:
//! what describes one connection is never forwarded, and an upgrade passes only when it is
//! one the proxy bridges. `h2c` is never one: after it the connection carries HTTP/2 that no
//! HTTP parser of the proxy sees, so its requests would escape routing and authorization
//! (h2c smuggling). It is removed from the request, which the application then answers as
//! the HTTP/1.1 request it also is (Envoy does the same).

use hyper::{
    HeaderMap, Request, Version,
    header::{self, HeaderName},
};
use hyper_util::rt::TokioIo;

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The settings an `Upgrade: h2c` request carries (RFC 7540 §3.2.1).
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`, named in `Connection`),
/// after any `h2c` has been removed from it; None when it asks for none (any more).
pub fn requested_upgrade<B>(request: &mut Request<B>) -> Option<String> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let headers = request.headers_mut();
    let asked = tokens(headers, header::CONNECTION).any(|token| token == "upgrade");
    let protocols: Vec<String> = tokens(headers, header::UPGRADE).collect();
    if protocols.iter().any(|p| is_h2c(p)) {
        tracing::debug!(?protocols, "h2c upgrade removed from the request");
        headers.remove(header::UPGRADE);
        headers.remove(HTTP2_SETTINGS);
        return None;
    }
    if !asked {
        return None;
    }
    (!protocols.is_empty()).then(|| protocols.join(", "))
}

fn is_h2c(protocol: &str) -> bool {
    protocol.split('/').next().unwrap_or_default().trim() == "h2c"
}

/// Removes hop-by-hop headers and those `Connection` names; with `keep_upgrade`, the two
/// that carry an upgrade (`Connection`, `Upgrade`) stay.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = tokens(headers, header::CONNECTION).collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        if keep_upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        // TE: trailers is the one TE value that is end-to-end in practice (gRPC needs it).
        if name == "te" {
            let trailers_only = headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            if trailers_only {
                continue;
            }
        }
        headers.remove(name);
    }
    if keep_upgrade {
        // Only the upgrade itself may be named: `Connection: upgrade`.
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
    }
}

/// The comma-separated tokens of the `name` headers, lower case.
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Copies an upgraded connection both ways once both ends have switched, until either
/// closes or `until` resolves (its authorization was withdrawn).
pub fn bridge_upgrade(
    downstream: Option<hyper::upgrade::OnUpgrade>,
    upstream: hyper::upgrade::OnUpgrade,
    until: impl Future<Output = ()> + Send + 'static,
) {
    let Some(downstream) = downstream else {
        return;
    };
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((client, server)) => {
                let mut client = TokioIo::new(client);
                let mut server = TokioIo::new(server);
                tokio::select! {
                    copied = tokio::io::copy_bidirectional(&mut client, &mut server) => {
                        if let Err(error) = copied {
                            tracing::debug!(%error, "upgraded connection ended with an error");
                        }
                    }
                    () = until => {}
                }
            }
            Err(error) => tracing::debug!(%error, "upgrade did not complete"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get("/public").version(Version::HTTP_11);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn h2c_is_removed_and_the_request_stays_plain_http() {
        for upgrade in ["h2c", "H2C", "websocket, h2c", "h2c/1"] {
            let mut r = request(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ]);
            assert_eq!(requested_upgrade(&mut r), None, "{upgrade}");
            assert!(!r.headers().contains_key(header::UPGRADE));
            assert!(!r.headers().contains_key("http2-settings"));
            strip_hop_by_hop(r.headers_mut(), false);
            assert!(r.headers().is_empty(), "{:?}", r.headers());
        }
    }

    #[test]
    fn websocket_is_an_upgrade_only_when_connection_names_it() {
        let mut r = request(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested_upgrade(&mut r).as_deref(), Some("websocket"));
        let mut r = request(&[("upgrade", "websocket")]);
        assert_eq!(requested_upgrade(&mut r), None);
        let mut r = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *r.version_mut() = Version::HTTP_2;
        assert_eq!(requested_upgrade(&mut r), None, "HTTP/2 has no Upgrade");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = request(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "secret"),
            ("x-end", "2"),
        ])
        .headers()
        .clone();
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end"]);

        let mut headers = request(&[("te", "trailers")]).headers().clone();
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.contains_key(header::TE), "TE: trailers is kept");

        let mut headers = request(&[
            ("connection", "upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
        ])
        .headers()
        .clone();
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert!(!headers.contains_key("x-hop"));
    }
}
