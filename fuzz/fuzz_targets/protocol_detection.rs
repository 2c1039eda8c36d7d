//! Protocol detection on arbitrary first bytes: never panics, and is prefix-consistent (a
//! decision made on a prefix is the decision on the whole input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::proxy::detect::classify;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for end in 0..data.len() {
        if let Some(early) = classify(&data[..end]) {
            assert_eq!(Some(early), whole, "decided {early:?} on {end} bytes");
            break;
        }
    }
});
