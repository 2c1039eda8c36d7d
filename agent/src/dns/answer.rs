//! What to do with one DNS query from a meshed pod: answer it from the cluster state, or
//! forward it to the pod's resolver. Messages are parsed and built with `hickory-proto`.
//!
//! Answered here, with the TTL CoreDNS's kubernetes plugin uses (5 s):
//! - `A`/`AAAA` of `<service>.<namespace>.svc.<domain>`: the ClusterIPs, or the ready
//!   endpoints of a headless Service;
//! - `A`/`AAAA` of `<hostname>.<service>.<namespace>.svc.<domain>`: the ready endpoints of
//!   Service `<service>` whose EndpointSlice entry carries that `hostname` (the pods of a
//!   StatefulSet, or any pod with `spec.hostname` and `spec.subdomain`);
//! - `NXDOMAIN` for `<a>.<b>.svc.<domain>` when no Service `<b>/<a>` exists, for
//!   `<a>.<b>.<c>.svc.<domain>` when no Service `<c>/<b>` exists (pod hostnames need that
//!   headless Service), and for names under `<domain>` that are neither Service nor pod
//!   names: what the search path makes of `example.com` (`example.com.<ns>.svc.<domain>`,
//!   `example.com.svc.<domain>`, `example.com.<domain>`), so those lookups cost no round trip
//!   to kube-dns. No SOA goes
//!   with them, so resolvers do not cache the denial (RFC 2308): a Service created a moment
//!   later is found at the next lookup.
//!
//! Forwarded: everything else, and whatever the cluster state cannot answer for certain
//! (other record types, a Service without addresses, ExternalName, pod and StatefulSet
//! hostnames not listed by a ready endpoint, other classes and opcodes). Nothing outside the cluster domain is ever
//! answered here, so no made-up address can come from us.

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata},
};

/// The TTL of local answers, as CoreDNS's kubernetes plugin.
pub const TTL: u32 = 5;

/// What the agent knows of Services, for DNS.
pub trait ServiceNames {
    /// The addresses of Service `namespace/name`: its ClusterIPs, else (headless) its ready
    /// endpoints. `None` when there is no such Service; empty when it has no address to give
    /// (ExternalName, or headless without ready endpoints).
    fn addresses(&self, namespace: &str, name: &str) -> Option<Vec<IpAddr>>;

    /// The addresses of the ready endpoints with hostname `host` behind Service
    /// `namespace/service` (a StatefulSet's pods). `None` when there is no such Service;
    /// empty when no ready endpoint has that hostname.
    fn hostname_addresses(&self, namespace: &str, service: &str, host: &str)
    -> Option<Vec<IpAddr>>;
}

/// How a query was handled, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with addresses (or no data of that type) from the cluster state.
    Local,
    /// Answered NXDOMAIN from the cluster state.
    LocalNxDomain,
    /// A malformed query, answered FORMERR.
    Malformed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::LocalNxDomain => "local_nxdomain",
            Outcome::Malformed => "malformed",
        }
    }
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send this answer back.
    Answer { message: Vec<u8>, outcome: Outcome },
    /// Forward the query, unchanged, to the pod's resolver.
    Forward,
    /// Not even a DNS header: nothing to answer.
    Drop,
}

/// The record type of a query, for metrics (`A`, `AAAA`, ..., `other` for garbage).
pub fn query_type(query: &[u8]) -> String {
    Message::from_vec(query)
        .ok()
        .and_then(|m| m.queries.first().map(|q| q.query_type().to_string()))
        .unwrap_or_else(|| "other".to_owned())
}

/// Decides what to do with `query` for a pod, the cluster domain being `domain`.
pub fn decide(query: &[u8], names: &impl ServiceNames, domain: &Name) -> Decision {
    let message = match Message::from_vec(query) {
        Ok(message) => message,
        Err(_) => return malformed(query),
    };
    let [question] = message.queries.as_slice() else {
        return Decision::Forward;
    };
    let metadata = &message.metadata;
    if metadata.message_type != MessageType::Query
        || metadata.op_code != OpCode::Query
        || question.query_class() != DNSClass::IN
    {
        return Decision::Forward;
    }
    let name = question.name();
    if !domain.zone_of(name) || name.num_labels() <= domain.num_labels() {
        return Decision::Forward;
    }
    let labels: Vec<String> = name
        .iter()
        .take(usize::from(name.num_labels() - domain.num_labels()))
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    match labels.as_slice() {
        [service, namespace, svc] if svc == "svc" => match names.addresses(namespace, service) {
            None => reply(&message, ResponseCode::NXDomain, Vec::new()),
            Some(addresses) if addresses.is_empty() => Decision::Forward,
            Some(addresses) => address_reply(&message, name, question.query_type(), &addresses),
        },
        // `<hostname>.<subdomain>.<namespace>.svc`: a pod of a StatefulSet has such a name
        // only behind a headless Service `<subdomain>`; without that Service it is what the
        // search path makes of a two-label name (`example.com.<namespace>.svc.<domain>`).
        // An endpoint's hostname is answered; one the cluster state does not list (not ready
        // yet, or a name kube-dns knows another way) is left to the resolver.
        [host, subdomain, namespace, svc] if svc == "svc" => {
            match names.hostname_addresses(namespace, subdomain, host) {
                None => reply(&message, ResponseCode::NXDomain, Vec::new()),
                Some(addresses) if addresses.is_empty() => Decision::Forward,
                Some(addresses) => address_reply(&message, name, question.query_type(), &addresses),
            }
        }
        // `example.com.<domain>`: not a Service, not a pod name, not the zone's own records.
        [.., last] if last != "svc" && last != "pod" && labels.len() >= 2 => {
            reply(&message, ResponseCode::NXDomain, Vec::new())
        }
        _ => Decision::Forward,
    }
}

/// The A or AAAA records of `addresses` (none of a family is NODATA); other types forwarded.
fn address_reply(query: &Message, name: &Name, kind: RecordType, addresses: &[IpAddr]) -> Decision {
    match kind {
        RecordType::A | RecordType::AAAA => {
            reply(query, ResponseCode::NoError, records(name, kind, addresses))
        }
        _ => Decision::Forward,
    }
}

fn records(name: &Name, record_type: RecordType, addresses: &[IpAddr]) -> Vec<Record> {
    addresses
        .iter()
        .filter_map(|address| match (record_type, address) {
            (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(rdata::A(*v4))),
            (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(rdata::AAAA(*v6))),
            _ => None,
        })
        .map(|data| Record::from_rdata(name.clone(), TTL, data))
        .collect()
}

fn reply(query: &Message, code: ResponseCode, answers: Vec<Record>) -> Decision {
    let mut response = Message::response(query.metadata.id, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = code;
    response.queries = query.queries.clone();
    response.answers = answers;
    // RFC 6891: a query with an OPT record gets one back.
    response.edns = query.edns.clone();
    let outcome = if code == ResponseCode::NXDomain {
        Outcome::LocalNxDomain
    } else {
        Outcome::Local
    };
    match response.to_vec() {
        Ok(message) => Decision::Answer { message, outcome },
        Err(_) => Decision::Forward,
    }
}

/// FORMERR with the query's ID, or nothing when there is no header to take it from.
fn malformed(query: &[u8]) -> Decision {
    let [high, low, ..] = query else {
        return Decision::Drop;
    };
    if query.len() < 12 {
        return Decision::Drop;
    }
    let id = u16::from_be_bytes([*high, *low]);
    match Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
        Ok(message) => Decision::Answer {
            message,
            outcome: Outcome::Malformed,
        },
        Err(_) => Decision::Drop,
    }
}

/// SERVFAIL for `query` (its ID and question), when forwarding failed.
pub fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    let message = Message::from_vec(query).ok()?;
    let mut response =
        Message::error_msg(message.metadata.id, OpCode::Query, ResponseCode::ServFail);
    response.metadata.recursion_desired = message.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.queries = message.queries;
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, str::FromStr};

    use hickory_proto::op::Query;

    use super::*;

    struct Services(BTreeMap<(String, String), Vec<IpAddr>>);

    impl ServiceNames for Services {
        fn addresses(&self, namespace: &str, name: &str) -> Option<Vec<IpAddr>> {
            self.0
                .get(&(namespace.to_owned(), name.to_owned()))
                .cloned()
        }

        /// Service shop/web's endpoint `db-0` is 10.0.0.7.
        fn hostname_addresses(&self, ns: &str, service: &str, host: &str) -> Option<Vec<IpAddr>> {
            self.addresses(ns, service)?;
            let known = (ns, service, host) == ("shop", "web", "db-0");
            Some(
                known
                    .then(|| "10.0.0.7".parse().unwrap())
                    .into_iter()
                    .collect(),
            )
        }
    }

    fn services() -> Services {
        Services(BTreeMap::from([
            (
                ("shop".to_owned(), "web".to_owned()),
                vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ),
            (("shop".to_owned(), "external".to_owned()), vec![]),
        ]))
    }

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_str(name).unwrap(), record_type));
        message.to_vec().unwrap()
    }

    fn answer(name: &str, record_type: RecordType) -> (Message, Outcome) {
        let domain = Name::from_str("cluster.local.").unwrap();
        match decide(&query(name, record_type), &services(), &domain) {
            Decision::Answer { message, outcome } => {
                (Message::from_vec(&message).unwrap(), outcome)
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    fn decision(name: &str, record_type: RecordType) -> Decision {
        let domain = Name::from_str("cluster.local.").unwrap();
        decide(&query(name, record_type), &services(), &domain)
    }

    #[test]
    fn a_service_name_is_answered_with_its_cluster_ips() {
        let (message, outcome) = answer("web.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(outcome, Outcome::Local);
        assert_eq!(message.metadata.id, 4242);
        assert_eq!(message.metadata.response_code, ResponseCode::NoError);
        assert!(message.metadata.authoritative);
        let data: Vec<String> = message.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(data, ["10.96.0.10"]);
        assert_eq!(message.answers[0].ttl, TTL);
        let (message, _) = answer("WEB.Shop.svc.cluster.local.", RecordType::AAAA);
        let data: Vec<String> = message.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(data, ["fd00::10"]);
    }

    #[test]
    fn an_endpoint_hostname_behind_its_service_is_answered() {
        let (message, outcome) = answer("DB-0.web.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(outcome, Outcome::Local);
        let data: Vec<String> = message.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(data, ["10.0.0.7"]);
        let (message, _) = answer("db-0.web.shop.svc.cluster.local.", RecordType::AAAA);
        assert!(message.answers.is_empty(), "NODATA: no IPv6 address");
        let (_, outcome) = answer("db-0.nosuch.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(outcome, Outcome::LocalNxDomain, "no such Service");
    }

    #[test]
    fn search_path_misses_are_denied_here_and_the_rest_is_forwarded() {
        for name in [
            "nosuch.shop.svc.cluster.local.",
            "example.com.shop.svc.cluster.local.",
            "example.com.svc.cluster.local.",
            "example.com.cluster.local.",
        ] {
            let (message, outcome) = answer(name, RecordType::A);
            assert_eq!(outcome, Outcome::LocalNxDomain, "{name}");
            assert_eq!(
                message.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
            assert!(
                message.authorities.is_empty(),
                "no SOA, no negative caching"
            );
        }
        for name in [
            "example.com.",
            "external.shop.svc.cluster.local.",
            "web-0.web.shop.svc.cluster.local.",
            "_http._tcp.web.shop.svc.cluster.local.",
            "10-0-0-1.shop.pod.cluster.local.",
            "shop.svc.cluster.local.",
            "cluster.local.",
        ] {
            assert_eq!(decision(name, RecordType::A), Decision::Forward, "{name}");
        }
        assert_eq!(
            decision("web.shop.svc.cluster.local.", RecordType::SRV),
            Decision::Forward
        );
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        let domain = Name::from_str("cluster.local.").unwrap();
        assert_eq!(decide(b"\x01", &services(), &domain), Decision::Drop);
        let mut truncated = query("web.shop.svc.cluster.local.", RecordType::A);
        truncated.truncate(20);
        match decide(&truncated, &services(), &domain) {
            Decision::Answer { message, outcome } => {
                assert_eq!(outcome, Outcome::Malformed);
                let message = Message::from_vec(&message).unwrap();
                assert_eq!(message.metadata.id, 4242);
                assert_eq!(message.metadata.response_code, ResponseCode::FormErr);
            }
            other => panic!("{other:?}"),
        }
        let failure = server_failure(&query("example.com.", RecordType::A)).unwrap();
        let failure = Message::from_vec(&failure).unwrap();
        assert_eq!(failure.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(failure.queries.len(), 1);
    }
}
