//! W3C trace context (`traceparent`) through the L7 proxy, and a request's trace id for the
//! access logs of both ends.
//!
//! The client's node proxy is a hop in the trace: a request carrying a valid `traceparent`
//! continues that trace, one without (or with an invalid one) starts a new trace; either
//! way the request leaves with a `traceparent` naming the proxy's own span as the parent,
//! so the application's spans nest under the mesh's. `tracestate` passes unchanged. The
//! proxy's span is exported over OTLP when an endpoint is configured (`telemetry::otlp`).

use hyper::{
    HeaderMap,
    header::{HeaderName, HeaderValue},
};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One span of the proxy: its trace, its own id, and the caller's span if there was one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl SpanIds {
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// `00-<trace id>-<span id>-<flags>`, written into one buffer.
    fn traceparent(&self) -> Option<HeaderValue> {
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex::encode_to_slice(self.trace_id, &mut text[3..35]).ok()?;
        hex::encode_to_slice(self.span_id, &mut text[36..52]).ok()?;
        text[54] = if self.sampled { b'1' } else { b'0' };
        HeaderValue::from_bytes(&text).ok()
    }
}

/// Parses a version-00 `traceparent`; None for anything invalid (all-zero ids included).
pub fn parse(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() {
        return None;
    }
    let trace: [u8; 16] = unhex(trace)?;
    let parent: [u8; 8] = unhex(parent)?;
    let flags: [u8; 1] = unhex(flags)?;
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace, parent, flags[0]))
}

/// The trace id of a request, as hex, or empty.
pub fn trace_id_of(headers: &HeaderMap) -> String {
    headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
        .map(|(trace, _, _)| hex::encode(trace))
        .unwrap_or_default()
}

/// Continues (or starts) the trace of a request and points its `traceparent` at the
/// proxy's new span.
pub fn propagate(headers: &mut HeaderMap) -> SpanIds {
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse);
    let span = match incoming {
        Some((trace_id, parent, flags)) => SpanIds {
            trace_id,
            span_id: random_id(),
            parent_span_id: Some(parent),
            sampled: flags & 1 == 1,
        },
        None => SpanIds {
            trace_id: random_id(),
            span_id: random_id(),
            parent_span_id: None,
            sampled: true,
        },
    };
    if let Some(value) = span.traceparent() {
        headers.insert(TRACEPARENT, value);
    }
    span
}

fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    while id == [0u8; N] {
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    id
}

/// `N` bytes from exactly `2 * N` lower-case hex digits (upper case is invalid in
/// traceparent).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut bytes = [0; N];
    hex::decode_to_slice(text, &mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn an_incoming_trace_is_continued_with_the_proxy_as_parent() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(INCOMING));
        let span = propagate(&mut headers);
        assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent_span_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        let outgoing = headers[TRACEPARENT].to_str().unwrap();
        let (trace, parent, flags) = parse(outgoing).unwrap();
        assert_eq!(
            (hex::encode(trace), parent, flags),
            (span.trace_id_hex(), span.span_id, 1)
        );
        assert_eq!(trace_id_of(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_missing_or_invalid_traceparent_starts_a_trace() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // Ids and flags of the wrong length.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-001",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            let mut headers = HeaderMap::new();
            if !bad.is_empty() {
                headers.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            }
            let span = propagate(&mut headers);
            assert_eq!(span.parent_span_id, None, "{bad:?}");
            assert!(parse(headers[TRACEPARENT].to_str().unwrap()).is_some());
        }
    }
}
