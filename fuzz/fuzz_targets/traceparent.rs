//! W3C traceparent: parsing never panics, and whatever header a request arrives with, the
//! proxy sends on a valid one that keeps a valid incoming trace id.
#![no_main]

use hyper::{HeaderMap, header::HeaderValue};
use libfuzzer_sys::fuzz_target;
use nodemesh::telemetry::trace::{TRACEPARENT, parse, propagate};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    // What the proxy sees is what a header can carry (no CR, LF or NUL): the incoming trace
    // is parsed from that, as the proxy does.
    let mut incoming = None;
    if let Ok(value) = HeaderValue::from_bytes(data) {
        incoming = value.to_str().ok().and_then(parse);
        headers.insert(TRACEPARENT, value);
    }
    let span = propagate(&mut headers);
    let outgoing = headers[TRACEPARENT].to_str().expect("ASCII");
    let (trace, parent, _) = parse(outgoing).expect("the proxy sends a valid traceparent");
    assert_eq!(parent, span.span_id);
    if let Some((incoming_trace, _, _)) = incoming {
        assert_eq!(trace, incoming_trace);
    }
});
