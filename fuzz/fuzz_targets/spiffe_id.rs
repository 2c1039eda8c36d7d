//! SPIFFE IDs: whatever parses prints back to the same text and parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::identity::spiffe::SpiffeId;

fuzz_target!(|text: &str| {
    if let Ok(id) = text.parse::<SpiffeId>() {
        let printed = id.to_string();
        let again: SpiffeId = printed.parse().expect("a printed ID parses");
        assert_eq!(again, id);
    }
});
