use super::*;

fn root() -> PathBuf {
    crate::workspace_root()
}

#[test]
fn the_committed_manifests_are_the_charts_rendering_and_valid() {
    lint_chart(&chart_dir(&root())).unwrap();
    let rendered = render_chart(&chart_dir(&root()), &[]).unwrap();
    let committed = std::fs::read_to_string(manifests_path(&root())).unwrap();
    assert_eq!(
        committed, rendered,
        "deploy/manifests/nodemesh.yaml is not `helm template`'s output: run `cargo xtask deploy render`"
    );
    assert!(validate_manifests(&committed).unwrap() >= 10);
    validate_against_schemas(&manifests_path(&root())).unwrap();
}

#[test]
fn an_image_digest_pins_both_containers_and_a_malformed_one_is_refused() {
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let rendered = render_chart(&chart_dir(&root()), &[("image.digest", &digest)]).unwrap();
    let images: Vec<&str> = rendered
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: "))
        .collect();
    let pinned = format!("\"ghcr.io/nodemesh/nodemesh@{digest}\"");
    assert_eq!(images, [pinned.as_str(); 2], "the agent and the CA");
    let error = render_chart(&chart_dir(&root()), &[("image.digest", "latest")]).unwrap_err();
    assert!(
        format!("{error:#}").contains("image.digest must be sha256:<64 hex digits>"),
        "{error:#}"
    );
}

#[test]
fn network_policies_render_on_request_and_guard_only_their_port() {
    let chart = chart_dir(&root());
    assert_eq!(check_network_policies(&chart).unwrap(), 2);
    let rendered = render_chart(&chart, NETWORK_POLICY_VALUES).unwrap();
    assert!(rendered.contains("cidr: \"10.0.0.0/24\""), "{rendered}");
    // A rule that admits the guarded port from anywhere is refused.
    let open = rendered.replacen("port: 15091, endPort", "port: 15090, endPort", 1);
    let error = format!("{:#}", validate_manifests(&open).unwrap_err());
    assert!(
        error.contains("port 15090 is admitted from anywhere"),
        "{error}"
    );
    let default = render_chart(&chart, &[]).unwrap();
    assert!(!default.contains("kind: NetworkPolicy"), "off by default");
}

#[test]
fn the_schema_validation_rejects_an_unknown_field() {
    let committed = std::fs::read_to_string(manifests_path(&root())).unwrap();
    let dir = tempfile_dir();
    let typo = dir.join("typo.yaml");
    std::fs::write(&typo, committed.replacen("hostPID:", "hostPid:", 1)).unwrap();
    let error = format!("{:#}", validate_against_schemas(&typo).unwrap_err());
    assert!(error.contains("hostPid"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodemesh-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn unknown_fields_and_broken_rules_are_reported_with_where() {
    let committed = std::fs::read_to_string(manifests_path(&root())).unwrap();
    let typo = committed.replacen("serviceAccountName:", "serviceAcountName:", 1);
    let error = format!("{:#}", validate_manifests(&typo).unwrap_err());
    assert!(
        error.contains("unknown field") && error.contains("serviceAcountName"),
        "{error}"
    );

    let privileged = committed.replacen("privileged: false", "privileged: true", 1);
    let error = format!("{:#}", validate_manifests(&privileged).unwrap_err());
    assert!(error.contains("must not be privileged"), "{error}");

    let surge = committed.replacen("maxUnavailable: 0", "maxUnavailable: 1", 1);
    let error = format!("{:#}", validate_manifests(&surge).unwrap_err());
    assert!(error.contains("maxSurge 1 and maxUnavailable 0"), "{error}");

    let greedy = committed.replacen(
        "verbs: [get, list, watch]",
        "verbs: [get, list, watch, delete]",
        1,
    );
    let error = format!("{:#}", validate_manifests(&greedy).unwrap_err());
    assert!(
        error.contains("nodemesh-agent may not delete namespaces"),
        "{error}"
    );
}

#[test]
fn what_the_agent_exposes_on_the_node_is_checked_with_its_args_expanded() {
    let committed = std::fs::read_to_string(manifests_path(&root())).unwrap();
    for (from, to, expected) in [
        (
            "--metrics-addr=$(HOST_IP):15090",
            "--metrics-addr=0.0.0.0:15090",
            "must be the node's address",
        ),
        (
            "--metrics-addr=$(HOST_IP):15090",
            "--metrics-addr=$(HOST_ADDRESS):15090",
            "passes $(HOST_ADDRESS)",
        ),
        (
            "fieldPath: status.hostIP",
            "fieldPath: status.podIP",
            "must be the node's address",
        ),
        (
            "--handoff-socket=/run/nodemesh/handoff.sock",
            "--handoff-socket=/tmp/handoff.sock",
            "must be a hostPath (DirectoryOrCreate) the agent mounts",
        ),
        (
            "type: RuntimeDefault",
            "type: Unconfined",
            "must run under seccompProfile RuntimeDefault",
        ),
    ] {
        assert!(committed.contains(from), "{from}");
        let changed = committed.replacen(from, to, 1);
        let error = format!("{:#}", validate_manifests(&changed).unwrap_err());
        assert!(error.contains(expected), "{to}: {error}");
    }
}
