//! DNS queries from a meshed pod (`dns/answer.rs`): deciding never panics, whatever arrives
//! (malformed headers, compression loops, oversized names, any record type); an answer the
//! agent sends is a DNS message that parses, carries the query's ID, and holds records only
//! for names under the cluster domain; a SERVFAIL, when built, parses too.
#![no_main]

use std::net::IpAddr;

use hickory_proto::{op::Message, rr::Name};
use libfuzzer_sys::fuzz_target;
use nodemesh::dns::answer::{Decision, ServiceNames, decide, server_failure};

/// Every Service exists, with one IPv4 and one IPv6 address, except in namespace `none`
/// (none exists) and `empty` (no addresses); its endpoints have every hostname but `none`.
struct Services;

impl ServiceNames for Services {
    fn addresses(&self, namespace: &str, _name: &str) -> Option<Vec<IpAddr>> {
        match namespace {
            "none" => None,
            "empty" => Some(Vec::new()),
            _ => Some(vec![
                [10, 96, 0, 10].into(),
                "fd00::10".parse().expect("address"),
            ]),
        }
    }

    fn hostname_addresses(&self, namespace: &str, name: &str, host: &str) -> Option<Vec<IpAddr>> {
        let addresses = self.addresses(namespace, name)?;
        Some(if host == "none" {
            Vec::new()
        } else {
            addresses
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let domain = Name::from_ascii("cluster.local.").expect("domain");
    if let Decision::Answer { message, .. } = decide(data, &Services, &domain) {
        let answer = Message::from_vec(&message).expect("the agent sends valid DNS");
        assert_eq!(answer.metadata.id.to_be_bytes(), [data[0], data[1]]);
        for record in &answer.answers {
            assert!(domain.zone_of(&record.name), "{record:?}");
        }
    }
    if let Some(failure) = server_failure(data) {
        Message::from_vec(&failure).expect("SERVFAIL is valid DNS");
    }
});
