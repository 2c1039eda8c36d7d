//! The CA and the identity manager end to end over real TLS on loopback: real certificates,
//! real CSRs, checked by openssl as well as by our own parser.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use super::{
    ca_client::{CaClient, CaClientError},
    ca_server::{self, CaServeArgs, SignRequest},
    issuer,
    manager::{IdentityManager, PodRef},
    spiffe::SpiffeId,
    tls,
};
use rcgen::{CertificateParams, KeyPair, SanType};

const TOKEN_NODE1: &str = "token-of-node1";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: "u1"}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, uid: "u2"}
spec: {nodeName: node2, serviceAccountName: db, containers: [{name: app, image: x}]}
"#;

struct Ca {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
}

async fn start_ca(ttl_seconds: u64) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    issuer::init_ca(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(
        dir.path().join("tokens"),
        format!("# token node\n{TOKEN_NODE1} node1\n"),
    )
    .unwrap();
    let args = CaServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        issuer_cert: dir.path().join("issuer-cert.pem"),
        issuer_key: dir.path().join("issuer-key.pem"),
        trust_domain: "cluster.local".into(),
        token_file: dir.path().join("tokens"),
        cluster_state: dir.path().join("state"),
        serve_names: vec!["nodemesh-ca".into()],
        cert_ttl_seconds: ttl_seconds,
    };
    let addr = ca_server::start(&args).await.unwrap();
    Ca { dir, addr }
}

fn client(ca: &Ca, token: &str) -> CaClient {
    let roots = tls::load_trust_bundle(&ca.dir.path().join("trust-bundle.pem")).unwrap();
    CaClient::new(
        ca.addr,
        "nodemesh-ca".try_into().unwrap(),
        tls::ca_client_config(roots).unwrap(),
        token.into(),
    )
}

/// A CSR that asks for an identity the CA must not grant.
fn greedy_csr() -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["kubernetes.default".to_owned()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn issues_the_pods_identity_ignoring_what_the_csr_asks_for() {
    let ca = start_ca(3600).await;
    let response = client(&ca, TOKEN_NODE1)
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "web-1".into(),
            csr: greedy_csr(),
        })
        .await
        .unwrap();
    assert_eq!(response.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");

    let chain =
        tls::certificates_from_pem("issued", response.certificate_chain.as_bytes()).unwrap();
    assert_eq!(chain.len(), 2, "leaf and issuer");
    assert_eq!(
        tls::spiffe_id_of(&chain[0]).unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    // openssl agrees: the chain verifies to the root, and the only SAN is ours.
    let dir = ca.dir.path();
    let pems: Vec<String> = response
        .certificate_chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .map(str::to_owned)
        .collect();
    std::fs::write(dir.join("leaf.pem"), &pems[0]).unwrap();
    std::fs::write(dir.join("chain.pem"), &pems[1]).unwrap();
    let verify = openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "chain.pem",
            "-purpose",
            "sslclient",
            "leaf.pem",
        ],
    );
    assert!(verify.contains("leaf.pem: OK"), "{verify}");
    let text = openssl(
        dir,
        &[
            "x509",
            "-in",
            "leaf.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/shop/sa/web"),
        "{text}"
    );
    assert!(
        !text.contains("kube-system") && !text.contains("kubernetes.default"),
        "CSR SANs must be ignored: {text}"
    );
}

#[tokio::test]
async fn refuses_pods_of_other_nodes_unknown_tokens_and_bad_csrs() {
    let ca = start_ca(3600).await;
    let node1 = client(&ca, TOKEN_NODE1);

    let other_node = node1
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "db-1".into(),
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

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_root_fails_the_handshake() {
    let ca = start_ca(3600).await;
    let elsewhere = tempfile::tempdir().unwrap();
    issuer::init_ca(elsewhere.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
    let roots = tls::load_trust_bundle(&elsewhere.path().join("trust-bundle.pem")).unwrap();
    let client = CaClient::new(
        ca.addr,
        "nodemesh-ca".try_into().unwrap(),
        tls::ca_client_config(roots).unwrap(),
        TOKEN_NODE1.into(),
    );
    let result = client
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "web-1".into(),
            csr: greedy_csr(),
        })
        .await;
    assert!(
        matches!(result, Err(CaClientError::Tls { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn the_manager_holds_renews_and_releases_certificates() {
    let ca = start_ca(3).await;
    let manager = IdentityManager::new(client(&ca, TOKEN_NODE1));
    tokio::spawn(Arc::clone(&manager).run());
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let pod: PodRef = ("shop".into(), "web-1".into());
    manager.set_desired([(web.clone(), pod)].into());

    // Renewal at 70% of a 3 s lifetime: wait (bounded) for two renewals.
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let views = manager.views();
            if views[0].renewals >= 2 {
                return views;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no renewals: {:?}", manager.views()));
    assert!(manager.all_held());
    let view = &manager.views()[0];
    assert!(view.last_error.is_none(), "{view:?}");
    let lifetime = view.not_after_unix.unwrap() - view.not_before_unix.unwrap();
    assert!(lifetime <= 4, "short TTL honoured: {lifetime}");

    manager.set_desired(Default::default());
    assert!(
        manager.views().is_empty(),
        "released when the last pod left"
    );
}

#[tokio::test]
async fn a_refused_identity_is_reported_and_retried() {
    let ca = start_ca(3600).await;
    let manager = IdentityManager::new(client(&ca, TOKEN_NODE1));
    tokio::spawn(Arc::clone(&manager).run());
    let db = SpiffeId::new("cluster.local", "shop", "db").unwrap();
    manager.set_desired([(db, ("shop".into(), "db-1".into()))].into());
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(error) = manager.views()[0].last_error.clone() {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("an error is reported");
    assert!(error.contains("403") && error.contains("node2"), "{error}");
    assert!(!manager.all_held());
}
