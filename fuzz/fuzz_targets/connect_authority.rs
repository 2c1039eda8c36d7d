//! The HBONE CONNECT target: any URI either names an ip:port that prints back to itself,
//! or is refused; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::proxy::hbone::connect::connect_target;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = hyper::Uri::try_from(data) else {
        return;
    };
    if let Some(target) = connect_target(&uri) {
        let again: hyper::Uri = target.to_string().parse().expect("an ip:port is a URI");
        assert_eq!(connect_target(&again), Some(target));
    }
});
