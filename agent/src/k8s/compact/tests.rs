//! The shape of what the agent stores: a pod as the API server sends it (pod.json: managed
//! fields, owner references, annotations, containers with env, resources and probes, full
//! status) goes in; exactly the fields the mesh reads come out. The destructuring `let`s list
//! every field, so a field added to a compact form without a reason breaks these tests.

use std::sync::Arc;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::*;
use crate::k8s::labels::MESH_LABEL;

fn full_pod() -> Pod {
    serde_json::from_str(include_str!("pod.json")).expect("pod.json is a Pod")
}

#[test]
fn a_remote_pod_keeps_only_what_the_workload_index_reads() {
    let mut strings = Interner::default();
    let pod = workload_pod(&full_pod(), &mut strings).expect("a meshable pod");
    let WorkloadPod {
        key,
        namespace,
        service_account,
        node,
        workload,
        ips,
    } = &pod;
    assert_eq!(&**key, "shop/checkout-7d9f8b6c5-x2x7q");
    assert_eq!(pod.name(), "checkout-7d9f8b6c5-x2x7q");
    assert_eq!(&**namespace, "shop");
    assert_eq!(&**service_account, "checkout");
    assert_eq!(&**node, "node-17");
    assert_eq!(&**workload, "checkout", "from app.kubernetes.io/name");
    assert_eq!(
        &**ips,
        [
            "10.244.17.23".parse::<IpAddr>().unwrap(),
            "fd00:244:17::23".parse().unwrap()
        ]
    );

    // A second pod of the same workload shares every repeated string.
    let mut other = full_pod();
    other.metadata.name = Some("checkout-7d9f8b6c5-k8p2m".into());
    let other = workload_pod(&other, &mut strings).expect("meshable");
    for (a, b) in [
        (&pod.namespace, &other.namespace),
        (&pod.service_account, &other.service_account),
        (&pod.node, &other.node),
        (&pod.workload, &other.workload),
    ] {
        assert!(Arc::ptr_eq(a, b), "{a} is shared");
    }
    // What a remote pod costs beyond its strings and addresses: six pointers.
    assert_eq!(std::mem::size_of::<WorkloadPod>(), 6 * 16);
}

#[test]
fn this_nodes_pod_keeps_what_enrolment_needs_and_its_probe_targets() {
    let pod = local_pod(&full_pod()).expect("named");
    let LocalPod {
        uid,
        namespace,
        name,
        service_account,
        labels,
        host_network,
        phase,
        ips,
        probes,
    } = &pod;
    assert_eq!(uid.as_deref(), Some("8f1c2e7a-3b4d-4e5f-9a8b-7c6d5e4f3a2b"));
    assert_eq!(
        (namespace.as_str(), name.as_str()),
        ("shop", "checkout-7d9f8b6c5-x2x7q")
    );
    assert_eq!(service_account, "checkout");
    assert_eq!(
        labels.len(),
        4,
        "AuthorizationPolicy selectors match any label"
    );
    assert!(!host_network);
    assert_eq!(phase.as_deref(), Some("Running"));
    assert_eq!(ips.len(), 2);
    assert_eq!(pod.workload(), "checkout");
    let http = |path: &str| ProbeHandler::Http {
        path: path.into(),
        https: false,
    };
    assert_eq!(
        probes,
        &[
            ProbeTarget {
                port: 8080,
                handler: http("/healthz"),
            },
            ProbeTarget {
                port: 8080,
                handler: http("/ready"),
            },
            ProbeTarget {
                port: 9095,
                handler: ProbeHandler::Grpc,
            },
            ProbeTarget {
                port: 9901,
                handler: ProbeHandler::Tcp,
            },
        ],
        "named ports resolved (http, admin of the sidecar), exec probes dropped, duplicates merged"
    );
}

#[test]
fn pods_that_can_never_be_meshed_as_they_stand_are_not_kept() {
    let mut strings = Interner::default();
    let mut opted_out = full_pod();
    opted_out
        .metadata
        .labels
        .get_or_insert_default()
        .insert(MESH_LABEL.into(), "disabled".into());
    let mut host = full_pod();
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut finished = full_pod();
    finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let mut pending = full_pod();
    let status = pending.status.as_mut().unwrap();
    (status.pod_ip, status.pod_ips) = (None, None);
    for (what, pod) in [
        ("opted out", opted_out),
        ("host network", host),
        ("finished", finished),
        ("no address yet", pending),
    ] {
        assert_eq!(workload_pod(&pod, &mut strings), None, "{what}");
    }
}

#[test]
fn services_keep_virtual_addresses_and_tcp_ports_slices_their_ready_addresses() {
    let mut strings = Interner::default();
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop", "managedFields": [{"manager": "x"}]},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                 "selector": {"app": "web"}, "sessionAffinity": "None",
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]},
    }))
    .unwrap();
    let ServiceInfo {
        key,
        virtual_ips,
        ports,
        zone_policy,
    } = service_info(&service, &mut strings).unwrap();
    assert_eq!(zone_policy, Ok(Default::default()));
    assert_eq!(&*key, "shop/web");
    assert_eq!(virtual_ips.len(), 2);
    assert_eq!(ports.len(), 1, "TCP ports only");
    assert_eq!(
        (
            &*ports[0].name,
            ports[0].port,
            ports[0].app_protocol.as_deref()
        ),
        ("http", 80, Some("http"))
    );

    let headless: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432}]},
    }))
    .unwrap();
    assert!(
        service_info(&headless, &mut strings)
            .unwrap()
            .virtual_ips
            .is_empty()
    );

    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.1.1"], "conditions": {"ready": true}, "nodeName": "n1",
             "hostname": "Web-1", "zone": "zone-a",
             "hints": {"forZones": [{"name": "zone-b"}], "forNodes": [{"name": "n2"}]},
             "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
            {"addresses": ["10.0.1.2"], "conditions": {"ready": false, "terminating": true},
             "hostname": "web-2", "zone": "zone-b"},
            {"addresses": ["10.0.1.3"], "conditions": {"ready": false}},
            {"addresses": ["10.0.1.4"]},
        ],
    }))
    .unwrap();
    let SliceInfo {
        key,
        service,
        ipv4,
        ports,
        ready,
        hostnames,
        zones,
        hints,
    } = slice_info(&slice, &mut strings).unwrap();
    assert_eq!(
        (&*key, service.as_deref(), ipv4),
        ("shop/web-abc", Some("shop/web"), true)
    );
    assert_eq!(&*ports, [(strings.intern("http"), 8080)]);
    assert_eq!(
        &*ready,
        [
            "10.0.1.1".parse::<IpAddr>().unwrap(),
            "10.0.1.4".parse().unwrap()
        ],
        "ready (unset counts) and not terminating"
    );
    assert_eq!(
        &*hostnames,
        [("web-1".into(), "10.0.1.1".parse().unwrap())],
        "the ready endpoints' hostnames, lower case"
    );
    assert_eq!(
        &*zones,
        [("10.0.1.1".parse().unwrap(), strings.intern("zone-a"))],
        "the ready endpoints' zones"
    );
    assert_eq!(
        &*hints,
        [(
            "10.0.1.1".parse().unwrap(),
            EndpointHints {
                zones: [strings.intern("zone-b")].into(),
                nodes: [strings.intern("n2")].into(),
            }
        )],
        "the ready endpoints' topology hints"
    );
}
