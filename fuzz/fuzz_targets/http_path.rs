//! The path L7 authorization decides on: normalising never panics, and what it returns is
//! normal already (normalising it again changes nothing), with no empty or dot segment
//! left that a server could read differently from the policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::proxy::inbound::path::normalize;

fuzz_target!(|data: &[u8]| {
    // What the proxy normalises is what a request target can carry.
    let Ok(uri) = hyper::Uri::try_from(data) else {
        return;
    };
    let Ok(normalized) = normalize(uri.path()) else {
        return;
    };
    assert_eq!(normalize(&normalized).as_deref(), Ok(normalized.as_str()));
    if normalized.starts_with('/') {
        let segments = normalized[1..].split('/');
        let last = normalized[1..].split('/').count() - 1;
        for (i, segment) in segments.enumerate() {
            assert!(segment != "." && segment != "..", "{normalized}");
            assert!(!segment.is_empty() || i == last, "{normalized}");
        }
    }
});
