use super::*;
use crate::state::{
    services::ServiceIndex,
    workloads::{SharedWorkloads, WorkloadIndex},
};

/// Indices as the agent builds them, and the workload index to read them back.
fn indices() -> (ClusterIndices, SharedWorkloads) {
    let workloads = WorkloadIndex::shared("cluster.local");
    let indices = ClusterIndices {
        workloads: workloads.clone(),
        services: ServiceIndex::shared(),
    };
    (indices, workloads)
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    nodemesh.io/mesh: enabled\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  uid: \"1111\"\nspec:\n  nodeName: node1\n  containers:\n  - name: app\n    image: nginx\nstatus:\n  podIP: 198.18.1.10\n";

#[test]
fn reads_multi_document_files_and_ignores_other_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{NAMESPACE}---\n{POD}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"
    );
    std::fs::write(dir.path().join("all.yaml"), text).unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), "not: [valid").unwrap();
    let (indices, workloads) = indices();
    let (snapshot, errors) = ClusterStateDir::new(dir.path(), "node1").refresh(&indices);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(snapshot.namespaces.len(), 1);
    assert_eq!(snapshot.local_pods["shop/web"].name, "web");
    let workloads = workloads.read().unwrap();
    assert_eq!(
        workloads
            .identity_of("198.18.1.10".parse().unwrap())
            .map(ToString::to_string)
            .as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/default"),
        "the same compact index as the API watches feed"
    );
}

#[test]
fn this_nodes_zone_comes_from_its_node_document_and_regions_from_all() {
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str, zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/zone: {zone}\n    topology.kubernetes.io/region: r-{zone}\n"
        )
    };
    let file = dir.path().join("nodes.yaml");
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            node("node2", "zone-b"),
            node("node1", "zone-a")
        ),
    )
    .unwrap();
    let services = ServiceIndex::shared();
    let (mut indices, _) = indices();
    indices.services = services.clone();
    let mut dir_state = ClusterStateDir::new(dir.path(), "node1");
    let (_, errors) = dir_state.refresh(&indices);
    assert!(errors.is_empty(), "{errors:?}");
    let zone = || services.read().unwrap().local_zone().map(|z| z.to_string());
    assert_eq!(
        zone().as_deref(),
        Some("zone-a"),
        "its own Node's, not another's"
    );
    {
        let index = services.read().unwrap();
        let topology = index.topology();
        assert_eq!(topology.region.as_deref(), Some("r-zone-a"));
        let regions: Vec<(&str, &str)> = (topology.zone_regions.iter())
            .map(|(z, r)| (&**z, &**r))
            .collect();
        assert_eq!(regions, [("zone-a", "r-zone-a"), ("zone-b", "r-zone-b")]);
    }
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n",
    )
    .unwrap();
    dir_state.refresh(&indices);
    assert_eq!(zone(), None, "the label removed");
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, POD).unwrap();
    let (indices, _) = indices();
    let mut state = ClusterStateDir::new(dir.path(), "node1");
    assert_eq!(state.refresh(&indices).0.local_pods.len(), 1);

    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n",
    )
    .unwrap();
    let (snapshot, errors) = state.refresh(&indices);
    assert_eq!(snapshot.local_pods.len(), 1, "last good pod kept");
    let message = errors[0].to_string();
    assert!(
        message.contains("pod.yaml") && message.contains("document 1") && message.contains("line"),
        "{message}"
    );

    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nameless-ns\n",
    )
    .unwrap();
    let (_, errors) = state.refresh(&indices);
    assert!(
        errors[0].to_string().contains("without metadata.namespace"),
        "{}",
        errors[0]
    );

    std::fs::remove_file(&file).unwrap();
    let (snapshot, errors) = state.refresh(&indices);
    assert!(errors.is_empty());
    assert!(
        snapshot.local_pods.is_empty() && indices.workloads.read().unwrap().is_empty(),
        "deleting the file deletes its objects"
    );
}

#[test]
fn reading_the_directory_is_not_a_change() {
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind};
    let event = |kind| notify::Event::new(kind);
    assert!(!is_change(&event(notify::EventKind::Access(
        AccessKind::Open(AccessMode::Read)
    ))));
    assert!(!is_change(&event(notify::EventKind::Access(
        AccessKind::Close(AccessMode::Read)
    ))));
    assert!(is_change(&event(notify::EventKind::Access(
        AccessKind::Close(AccessMode::Write)
    ))));
    assert!(is_change(&event(notify::EventKind::Create(
        CreateKind::File
    ))));
    assert!(is_change(&event(notify::EventKind::Modify(
        ModifyKind::Any
    ))));
    assert!(is_change(&event(notify::EventKind::Remove(
        RemoveKind::File
    ))));
}

#[test]
fn an_invalid_peer_authentication_label_keeps_the_last_good_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ns.yaml");
    std::fs::write(&file, NAMESPACE).unwrap();
    let (indices, _) = indices();
    let mut state = ClusterStateDir::new(dir.path(), "node1");
    assert_eq!(state.refresh(&indices).0.namespaces.len(), 1);

    std::fs::write(
        &file,
        format!("{NAMESPACE}    nodemesh.io/peer-authentication: strikt\n"),
    )
    .unwrap();
    let (snapshot, errors) = state.refresh(&indices);
    let message = errors[0].to_string();
    assert!(
        message.contains("ns.yaml")
            && message.contains("Namespace shop")
            && message.contains("\"strikt\""),
        "{message}"
    );
    let shop = &snapshot.namespaces["shop"];
    assert_eq!(
        shop.peer_authentication,
        crate::k8s::labels::PeerAuthentication::Permissive,
        "the last good namespace is kept"
    );
}
