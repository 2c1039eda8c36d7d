//! Cluster-state manifests (the `--cluster-state` directory's YAML): any text is either
//! objects or an error naming the file; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::k8s::cluster_state::parse_text;

fuzz_target!(|text: &str| {
    let path = std::path::Path::new("fuzz.yaml");
    if let Err(error) = parse_text(path, text) {
        assert!(error.to_string().starts_with("fuzz.yaml"), "{error}");
    }
});
