//! What the CA refuses, over its real HTTPS endpoint: other nodes' pods, unknown tokens,
//! bad CSRs, pods that are not the enrolled one or not in the mesh, names that are not
//! names, and lifetimes past the cap.

use super::*;

#[tokio::test]
async fn refuses_pods_of_other_nodes_unknown_tokens_and_bad_csrs() {
    let ca = start_ca(3600).await;
    let node1 = client(&ca, TOKEN_NODE1);

    let other_node = node1
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "db-1".into(),
            uid: Some("u2".into()),
            csr: greedy_csr(),
        })
        .await;
    match other_node {
        Err(CaClientError::Refused { status, message }) => {
            assert_eq!(status, 403);
            assert!(
                message.contains("runs on node \"node2\", not on the caller's node node1"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let unknown_pod = node1
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "ghost".into(),
            uid: Some("u9".into()),
            csr: greedy_csr(),
        })
        .await;
    assert!(
        matches!(unknown_pod, Err(CaClientError::Refused { status, .. }) if status == 403),
        "{unknown_pod:?}"
    );

    let stranger = client(&ca, "stolen-or-made-up")
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "web-1".into(),
            uid: Some("u1".into()),
            csr: greedy_csr(),
        })
        .await;
    assert!(
        matches!(stranger, Err(CaClientError::Refused { status, .. }) if status == 401),
        "{stranger:?}"
    );

    let garbage = node1
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "web-1".into(),
            uid: Some("u1".into()),
            csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .into(),
        })
        .await;
    match garbage {
        Err(CaClientError::Refused { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("CSR"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// node1's agent asking for `namespace/pod` with `uid`; the refusal's status and message.
async fn refusal_to_node1(ca: &Ca, namespace: &str, pod: &str, uid: Option<&str>) -> (u16, String) {
    let result = client(ca, TOKEN_NODE1)
        .sign(&SignRequest {
            namespace: namespace.into(),
            pod: pod.into(),
            uid: uid.map(str::to_owned),
            csr: greedy_csr(),
        })
        .await;
    match result {
        Err(CaClientError::Refused { status, message }) => (status.as_u16(), message),
        other => panic!("{namespace}/{pod}: expected a refusal, got {other:?}"),
    }
}

/// Every pod asked for here runs on node1, the caller's node, with a valid service account:
/// the node check alone would have issued each of them a certificate.
#[tokio::test]
async fn refuses_pods_that_are_not_the_enrolled_one_finished_deleted_or_outside_the_mesh() {
    let ca = start_ca(3600).await;
    for (namespace, pod, uid, expected) in [
        (
            "shop",
            "web-1",
            "u-recreated",
            "has uid u1, not u-recreated",
        ),
        (
            "plain",
            "outsider",
            "u3",
            "its namespace is not labelled nodemesh.io/mesh=enabled",
        ),
        ("shop", "done", "u4", "has finished (Succeeded)"),
        ("shop", "leaving", "u5", "is being deleted"),
        ("shop", "opted-out", "u6", "opted out"),
    ] {
        let (status, message) = refusal_to_node1(&ca, namespace, pod, Some(uid)).await;
        assert_eq!(status, 403, "{namespace}/{pod}: {message}");
        assert!(
            message.contains(&format!("pod {namespace}/{pod} ")) && message.contains(expected),
            "{namespace}/{pod}: {message}"
        );
    }
}

/// Names go into the API server's URLs: a `?` or `/` in them makes the CA read another object
/// than the request names (`token_review`'s tests show the API server answering with another
/// namespace's pod). They are refused before any lookup, as is a request without the pod's
/// UID.
#[tokio::test]
async fn names_that_are_not_kubernetes_names_and_requests_without_a_uid_get_400() {
    let ca = start_ca(3600).await;
    for (namespace, pod, uid, expected) in [
        (
            "shop",
            "../../kube-system/pods/admin",
            Some("u1"),
            "is not a Kubernetes pod name",
        ),
        (
            "shop/pods/web-1?",
            "x",
            Some("u1"),
            "is not a Kubernetes namespace name",
        ),
        ("Shop", "web-1", Some("u1"), "DNS-1123 label"),
        (
            "shop",
            "web-1",
            None,
            "the agent is older than the CA; upgrade it",
        ),
        ("shop", "web-1", Some("u1/.."), "is not a Kubernetes UID"),
    ] {
        let (status, message) = refusal_to_node1(&ca, namespace, pod, uid).await;
        assert_eq!(status, 400, "{namespace}/{pod}: {message}");
        assert!(message.contains(expected), "{namespace}/{pod}: {message}");
    }
}

#[tokio::test]
async fn certificates_never_outlive_their_issuer_and_lifetimes_are_capped() {
    // The test CA's issuer expires in an hour; certificates are asked for the longest
    // lifetime the CA allows.
    let ca = start_ca(issuer::MAX_WORKLOAD_TTL_SECONDS).await;
    let response = client(&ca, TOKEN_NODE1)
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "web-1".into(),
            uid: Some("u1".into()),
            csr: greedy_csr(),
        })
        .await
        .unwrap();
    let leaf = tls::certificates_from_pem("leaf", response.certificate_chain.as_bytes()).unwrap();
    let issuer_pem = std::fs::read(ca.dir.path().join("issuer-cert.pem")).unwrap();
    let issuer_cert = tls::certificates_from_pem("issuer", &issuer_pem).unwrap();
    let not_after = |der: &rustls_pki_types::CertificateDer<'_>| {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, parsed) = X509Certificate::from_der(der.as_ref()).unwrap();
        parsed.validity().not_after.timestamp()
    };
    assert_eq!(not_after(&leaf[0]), not_after(&issuer_cert[0]));
    assert_eq!(response.not_after_unix as i64, not_after(&issuer_cert[0]));

    // Beyond the cap the CA does not start, and the issuer does not sign.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: CaServeArgs,
    }
    let too_long = (issuer::MAX_WORKLOAD_TTL_SECONDS + 1).to_string();
    let error = <Cli as clap::Parser>::try_parse_from([
        "ca",
        "--issuer-cert",
        "c",
        "--issuer-key",
        "k",
        "--kubernetes",
        "--cert-ttl-seconds",
        &too_long,
    ])
    .err()
    .expect("refused")
    .to_string();
    assert!(error.contains("604801 is not in 1..=604800"), "{error}");
    let signer = issuer::WorkloadIssuer::from_files(
        &ca.dir.path().join("issuer-cert.pem"),
        &ca.dir.path().join("issuer-key.pem"),
    )
    .unwrap();
    let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let over = Duration::from_secs(issuer::MAX_WORKLOAD_TTL_SECONDS + 1);
    assert!(matches!(
        signer.sign(&greedy_csr(), &id, over),
        Err(issuer::IssuerError::Lifetime(_))
    ));
}
