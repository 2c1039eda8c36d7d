use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort as K8sServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::*;
use crate::k8s::{
    compact::{self, SERVICE_NAME_LABEL},
    intern::Interner,
};

fn service(name: &str, cluster_ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: cluster_ips.first().map(|ip| (*ip).to_owned()),
            cluster_ips: Some(cluster_ips.iter().map(|ip| (*ip).to_owned()).collect()),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, target)| K8sServicePort {
                        name: (!name.is_empty()).then(|| (*name).to_owned()),
                        port: *port,
                        target_port: Some(match target.parse::<i32>() {
                            Ok(number) => IntOrString::Int(number),
                            Err(_) => IntOrString::String((*target).to_owned()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An EndpointSlice of `service`: endpoints are (address, ready, terminating, node).
fn slice(
    name: &str,
    service: &str,
    family: &str,
    ports: &[(&str, i32)],
    endpoints: &[(&str, bool, bool, &str)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_owned(),
                service.to_owned(),
            )])),
            ..Default::default()
        },
        address_type: family.into(),
        ports: Some(
            ports
                .iter()
                .map(|(name, port)| EndpointPort {
                    name: Some((*name).to_owned()),
                    port: Some(*port),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(addr, ready, terminating, node)| Endpoint {
                    addresses: vec![(*addr).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*ready || *terminating),
                        terminating: Some(*terminating),
                    }),
                    node_name: Some((*node).to_owned()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// The index after these objects' watch events, through the sources' transforms.
fn index(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ServiceIndex {
    let mut index = ServiceIndex::default();
    apply(&mut index, services, slices);
    index
}

fn apply(index: &mut ServiceIndex, services: Vec<Service>, slices: Vec<EndpointSlice>) {
    let mut strings = Interner::default();
    for s in services {
        let info = compact::service_info(&s, &mut strings).unwrap();
        index.upsert_service(&info.key.clone(), Some(info));
    }
    for s in slices {
        let info = compact::slice_info(&s, &mut strings).unwrap();
        index.upsert_slice(&info.key.clone(), Some(info));
    }
}

/// Every endpoint the index hands out for `vip` over many picks.
fn picks(index: &ServiceIndex, vip: &str) -> BTreeSet<String> {
    (0..20)
        .filter_map(|_| match index.resolve(vip.parse().unwrap(), |_| true) {
            Resolution::Endpoint { addr, .. } => Some(addr.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn named_and_numeric_target_ports_several_ports_and_endpoints_on_all_nodes() {
    let web = service(
        "web",
        &["10.96.0.10"],
        &[("http", 80, "http"), ("admin", 9000, "9001")],
    );
    // The named port resolves to 8080 on two pods and 8081 on a third: two slices.
    let a = slice(
        "web-a",
        "web",
        "IPv4",
        &[("http", 8080), ("admin", 9001)],
        &[
            ("10.0.1.1", true, false, "node1"),
            ("10.0.2.1", true, false, "node2"),
        ],
    );
    let b = slice(
        "web-b",
        "web",
        "IPv4",
        &[("http", 8081), ("admin", 9001)],
        &[("10.0.3.1", true, false, "node3")],
    );
    let index = index(vec![web], vec![a, b]);
    assert_eq!(
        picks(&index, "10.96.0.10:80"),
        BTreeSet::from([
            "10.0.1.1:8080".into(),
            "10.0.2.1:8080".into(),
            "10.0.3.1:8081".into()
        ])
    );
    assert_eq!(
        picks(&index, "10.96.0.10:9000"),
        BTreeSet::from([
            "10.0.1.1:9001".into(),
            "10.0.2.1:9001".into(),
            "10.0.3.1:9001".into()
        ])
    );
    assert_eq!(
        index.resolve("10.96.0.10:81".parse().unwrap(), |_| true),
        Resolution::NotAService
    );
    assert_eq!(
        index.resolve("10.0.1.1:8080".parse().unwrap(), |_| true),
        Resolution::NotAService,
        "pod addresses are dialled as they are"
    );
}

#[test]
fn an_update_continues_the_rotation_and_a_relist_drops_what_it_missed() {
    let web = || service("web", &["10.96.0.10"], &[("", 80, "8080")]);
    let endpoints = || {
        slice(
            "web-a",
            "web",
            "IPv4",
            &[("", 8080)],
            &[
                ("10.0.1.1", true, false, "n"),
                ("10.0.1.2", true, false, "n"),
            ],
        )
    };
    let vip = "10.96.0.10:80".parse().unwrap();
    let mut index = index(vec![web()], vec![endpoints()]);
    let Resolution::Endpoint { addr: before, .. } = index.resolve(vip, |_| true) else {
        panic!("resolves")
    };
    apply(&mut index, vec![web()], vec![endpoints()]);
    let Resolution::Endpoint { addr: after, .. } = index.resolve(vip, |_| true) else {
        panic!("resolves")
    };
    assert_ne!(before, after);
    assert!(index.has_endpoint(&after));

    // A relist that mentions the Service but not its slice: no endpoint is left.
    index.begin_service_relist();
    index.begin_slice_relist();
    apply(&mut index, vec![web()], vec![]);
    index.end_service_relist();
    index.end_slice_relist();
    assert_eq!(
        index.resolve(vip, |_| true),
        Resolution::NoReadyEndpoint {
            service: "shop/web"
        }
    );
    assert!(!index.has_endpoint(&after));

    // The Service deleted: its address is no Service's any more.
    index.upsert_service("shop/web", None);
    assert_eq!(index.resolve(vip, |_| true), Resolution::NotAService);
    assert!(!index.contains("shop/web"));
}

#[test]
fn terminating_and_unready_endpoints_are_not_chosen() {
    let web = service("web", &["10.96.0.10"], &[("", 80, "8080")]);
    let endpoints = slice(
        "web-a",
        "web",
        "IPv4",
        &[("", 8080)],
        &[
            ("10.0.1.1", true, false, "node1"),
            ("10.0.1.2", false, true, "node1"),
            ("10.0.1.3", false, false, "node2"),
        ],
    );
    let index = index(vec![web], vec![endpoints]);
    assert_eq!(
        picks(&index, "10.96.0.10:80"),
        BTreeSet::from(["10.0.1.1:8080".into()])
    );

    let none_ready = slice(
        "web-a",
        "web",
        "IPv4",
        &[("", 8080)],
        &[("10.0.1.2", false, true, "node1")],
    );
    let index = super::tests::index(
        vec![service("web", &["10.96.0.10"], &[("", 80, "8080")])],
        vec![none_ready],
    );
    assert_eq!(
        index.resolve("10.96.0.10:80".parse().unwrap(), |_| true),
        Resolution::NoReadyEndpoint {
            service: "shop/web"
        }
    );
}

#[test]
fn dual_stack_uses_the_family_of_the_virtual_address_and_headless_has_none() {
    let web = service("web", &["10.96.0.10", "fd00:96::10"], &[("", 80, "8080")]);
    let v4 = slice(
        "web-v4",
        "web",
        "IPv4",
        &[("", 8080)],
        &[("10.0.1.1", true, false, "n")],
    );
    let v6 = slice(
        "web-v6",
        "web",
        "IPv6",
        &[("", 8080)],
        &[("fd00::1", true, false, "n")],
    );
    let headless = service("db", &["None"], &[("", 5432, "5432")]);
    let db = slice(
        "db-a",
        "db",
        "IPv4",
        &[("", 5432)],
        &[("10.0.1.9", true, false, "n")],
    );
    let index = index(vec![web, headless], vec![v4, v6, db]);
    assert_eq!(
        picks(&index, "10.96.0.10:80"),
        BTreeSet::from(["10.0.1.1:8080".into()])
    );
    assert_eq!(
        picks(&index, "[fd00:96::10]:80"),
        BTreeSet::from(["[fd00::1]:8080".into()])
    );
    assert_eq!(
        index.views().len(),
        2,
        "the headless service has no virtual address"
    );
}

/// `slice` with each endpoint's zone and hints (zone hints, node hints) set.
fn with_topology(mut slice: EndpointSlice, topology: &[(&str, &[&str], &[&str])]) -> EndpointSlice {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
    let endpoints = slice.endpoints.iter_mut().flatten();
    for (endpoint, (zone, for_zones, for_nodes)) in endpoints.zip(topology) {
        endpoint.zone = Some((*zone).to_owned());
        if !for_zones.is_empty() || !for_nodes.is_empty() {
            endpoint.hints = Some(EndpointHints {
                for_zones: Some(
                    (for_zones.iter())
                        .map(|z| ForZone {
                            name: (*z).to_owned(),
                        })
                        .collect(),
                ),
                for_nodes: Some(
                    (for_nodes.iter())
                        .map(|n| ForNode {
                            name: (*n).to_owned(),
                        })
                        .collect(),
                ),
            });
        }
    }
    slice
}

/// One endpoint in each of zone-a, zone-b and zone-c, without hints.
const NO_HINTS: [(&str, &[&str], &[&str]); 3] = [
    ("zone-a", &[], &[]),
    ("zone-b", &[], &[]),
    ("zone-c", &[], &[]),
];

/// Service `web` on port 80 → 8080.
fn web() -> Service {
    service("web", &["10.96.0.10"], &[("", 80, "8080")])
}

fn three_zones(topology: &[(&str, &[&str], &[&str])]) -> EndpointSlice {
    with_topology(
        slice(
            "web-a",
            "web",
            "IPv4",
            &[("", 8080)],
            &[
                ("10.0.1.1", true, false, "node-1"),
                ("10.0.2.1", true, false, "node-2"),
                ("10.0.3.1", true, false, "node-3"),
            ],
        ),
        topology,
    )
}

/// node `node` in `zone`; zone-a and zone-b in region-1, zone-c in region-2 when `region`
/// says where this node is.
fn topology(node: &str, zone: &str, region: Option<&str>) -> Topology {
    Topology {
        node: node.into(),
        zone: Some(zone.into()),
        region: region.map(Into::into),
        zone_regions: [
            ("zone-a", "region-1"),
            ("zone-b", "region-1"),
            ("zone-c", "region-2"),
        ]
        .into_iter()
        .map(|(z, r)| (Arc::from(z), Arc::from(r)))
        .collect(),
    }
}

fn preference(index: &ServiceIndex) -> (Option<Preference>, Vec<String>) {
    let candidates = index.candidates("shop/web", 80, true).expect("the port");
    let order = (candidates.endpoints.iter()).map(ToString::to_string);
    (candidates.preference, order.collect())
}

#[test]
fn this_zones_endpoints_come_first_and_connections_stay_there_until_none_is_ready() {
    let zones = NO_HINTS;
    let mut index = index(vec![web()], vec![three_zones(&zones)]);
    assert_eq!(preference(&index).0, None, "no zone for this node yet");
    index.set_topology(topology("node-2", "zone-b", None));
    assert_eq!(
        preference(&index),
        (
            Some(Preference {
                by: PreferredBy::Zone,
                count: 1,
                region: 0,
            }),
            vec![
                "10.0.2.1:8080".into(),
                "10.0.1.1:8080".into(),
                "10.0.3.1:8080".into()
            ]
        )
    );
    let picks = picks(&index, "10.96.0.10:80");
    assert_eq!(picks, BTreeSet::from(["10.0.2.1:8080".into()]));
    let Resolution::Endpoint { zone, .. } =
        index.resolve("10.96.0.10:80".parse().unwrap(), |_| true)
    else {
        panic!("resolves")
    };
    assert_eq!(zone.map(|z| &**z), Some("zone-b"));
    // The zone's endpoint gone: connections fail over to the others.
    let mut gone = three_zones(&zones);
    gone.endpoints.as_mut().unwrap()[1].conditions = Some(Default::default());
    gone.endpoints.as_mut().unwrap()[1]
        .conditions
        .as_mut()
        .unwrap()
        .ready = Some(false);
    apply(&mut index, vec![], vec![gone]);
    assert_eq!(preference(&index).0.map(|p| p.count), Some(0));
    assert_eq!(
        super::tests::picks(&index, "10.96.0.10:80"),
        BTreeSet::from(["10.0.1.1:8080".into(), "10.0.3.1:8080".into()])
    );
}

#[test]
fn zone_hints_then_node_hints_under_prefer_same_node_and_a_policy_turned_off() {
    let mut web = service("web", &["10.96.0.10"], &[("", 80, "8080")]);
    // The controller gave zone-b's clients the endpoint in zone-a too (its share by CPUs).
    let hinted = [
        ("zone-a", &["zone-a", "zone-b"][..], &["node-1"][..]),
        ("zone-b", &["zone-b"], &["node-2"]),
        ("zone-c", &["zone-c"], &["node-3"]),
    ];
    let mut index = index(vec![web.clone()], vec![three_zones(&hinted)]);
    index.set_topology(topology("node-2", "zone-b", None));
    assert_eq!(
        preference(&index),
        (
            Some(Preference {
                by: PreferredBy::ZoneHints,
                count: 2,
                region: 0,
            }),
            vec![
                "10.0.1.1:8080".into(),
                "10.0.2.1:8080".into(),
                "10.0.3.1:8080".into()
            ]
        )
    );
    // An endpoint without hints: hints are ignored for all, as kube-proxy does.
    let partial = [hinted[0], hinted[1], ("zone-c", &[][..], &[][..])];
    apply(&mut index, vec![], vec![three_zones(&partial)]);
    assert_eq!(preference(&index).0.map(|p| p.by), Some(PreferredBy::Zone));
    // PreferSameNode: the node hints decide.
    web.spec.as_mut().unwrap().traffic_distribution = Some("PreferSameNode".into());
    apply(&mut index, vec![web.clone()], vec![three_zones(&hinted)]);
    assert_eq!(
        preference(&index).0,
        Some(Preference {
            by: PreferredBy::NodeHints,
            count: 1,
            region: 0,
        })
    );
    // Off: no preference, every endpoint in rotation.
    web.metadata.annotations = Some(BTreeMap::from([(
        "nodemesh.io/zone-affinity".to_owned(),
        "off".to_owned(),
    )]));
    apply(&mut index, vec![web], vec![]);
    assert_eq!(preference(&index).0, None);
    assert_eq!(picks(&index, "10.96.0.10:80").len(), 3);
}

#[test]
fn a_rejected_zone_annotation_keeps_the_last_good_policy_and_is_reported() {
    let mut web = service("web", &["10.96.0.10"], &[("", 80, "8080")]);
    web.metadata.annotations = Some(BTreeMap::from([(
        "nodemesh.io/zone-spill-at".to_owned(),
        "8".to_owned(),
    )]));
    let mut index = index(vec![web.clone()], vec![three_zones(&NO_HINTS)]);
    let policy = |index: &ServiceIndex| index.candidates("shop/web", 80, true).unwrap().policy;
    assert_eq!(policy(&index).spill_at, 8.0);
    web.metadata.annotations = Some(BTreeMap::from([(
        "nodemesh.io/zone-spill-at".to_owned(),
        "lots".to_owned(),
    )]));
    apply(&mut index, vec![web.clone()], vec![]);
    assert_eq!(policy(&index).spill_at, 8.0, "the last good policy");
    assert_eq!(
        index.errors(),
        [
            "Service shop/web: annotation nodemesh.io/zone-spill-at=\"lots\" is not a number of requests from 0.5 to 10000; keeping its last good zone policy"
        ]
    );
    web.metadata.annotations = None;
    apply(&mut index, vec![web], vec![]);
    assert_eq!(policy(&index).spill_at, 4.0);
    assert!(index.errors().is_empty());
}

#[test]
fn the_region_comes_after_the_zone_for_requests_and_connections() {
    let mut index = index(vec![web()], vec![three_zones(&NO_HINTS)]);
    index.set_topology(topology("node-2", "zone-b", Some("region-1")));
    assert_eq!(
        preference(&index),
        (
            Some(Preference {
                by: PreferredBy::Zone,
                count: 1,
                region: 1,
            }),
            vec![
                "10.0.2.1:8080".into(),
                "10.0.1.1:8080".into(),
                "10.0.3.1:8080".into()
            ]
        ),
        "zone-b, then zone-a (region-1), then zone-c"
    );
    // zone-b's endpoint gone: connections go to zone-a, in the region, not zone-c.
    let mut gone = three_zones(&NO_HINTS);
    let conditions = &mut gone.endpoints.as_mut().unwrap()[1].conditions;
    *conditions = Some(EndpointConditions {
        ready: Some(false),
        ..Default::default()
    });
    apply(&mut index, vec![], vec![gone]);
    assert_eq!(
        picks(&index, "10.96.0.10:80"),
        BTreeSet::from(["10.0.1.1:8080".into()])
    );
}

#[test]
fn connections_skip_unusable_endpoints_tier_by_tier() {
    let mut index = index(vec![web()], vec![three_zones(&NO_HINTS)]);
    index.set_topology(topology("node-2", "zone-b", Some("region-1")));
    let vip = "10.96.0.10:80".parse().unwrap();
    let pick = |index: &ServiceIndex, usable: &dyn Fn(&SocketAddr) -> bool| {
        let picked: BTreeSet<String> = (0..10)
            .filter_map(|_| match index.resolve(vip, usable) {
                Resolution::Endpoint { addr, .. } => Some(addr.to_string()),
                _ => None,
            })
            .collect();
        picked
    };
    let down = |down: &'static [&'static str]| {
        move |e: &SocketAddr| !down.contains(&e.to_string().as_str())
    };
    // zone-b's endpoint unusable (ejected, or a connect to it just failed): the region's.
    assert_eq!(
        pick(&index, &down(&["10.0.2.1:8080"])),
        BTreeSet::from(["10.0.1.1:8080".into()])
    );
    // The region's too: beyond it.
    assert_eq!(
        pick(&index, &down(&["10.0.2.1:8080", "10.0.1.1:8080"])),
        BTreeSet::from(["10.0.3.1:8080".into()])
    );
    // None usable: the preferred one regardless (some traffic beats none).
    let all = down(&["10.0.2.1:8080", "10.0.1.1:8080", "10.0.3.1:8080"]);
    assert_eq!(pick(&index, &all), BTreeSet::from(["10.0.2.1:8080".into()]));
}
