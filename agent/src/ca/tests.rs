//! The CA and the identity manager end to end over real TLS on loopback: real certificates,
//! real CSRs, checked by openssl as well as by our own parser.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use super::{
    issuer,
    server::{self, CaServeArgs},
};
use crate::identity::{
    ca_client::{CaClient, CaClientError, SignRequest},
    manager::{IdentityManager, PodRef},
    spiffe::SpiffeId,
    tls,
};
use rcgen::{CertificateParams, KeyPair, SanType};

mod refusals;

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
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain, uid: "u3"}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, uid: "u4"}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
status: {phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: leaving, namespace: shop, uid: "u5", deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, uid: "u6", labels: {nodemesh.io/mesh: disabled}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
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
        kubernetes: false,
        token_audience: "nodemesh".into(),
        agent_service_account: "nodemesh-system/nodemesh-agent".into(),
        token_file: Some(dir.path().join("tokens")),
        cluster_state: Some(dir.path().join("state")),
        serve_names: vec!["nodemesh-ca".into()],
        cert_ttl_seconds: ttl_seconds,
        mesh_node_sweep_seconds: 0,
        max_connections: 512,
        max_connections_per_source: 32,
    };
    let addr = server::start(&args).await.unwrap();
    Ca { dir, addr }
}

fn pod_ref(name: &str, uid: &str) -> PodRef {
    PodRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

/// A token file holding `token`, as the agent's projected token would be.
fn token_file(ca: &Ca, token: &str) -> std::path::PathBuf {
    let name: String = token
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = ca.dir.path().join(format!("agent-token-{name}"));
    std::fs::write(&path, token).unwrap();
    path
}

fn client(ca: &Ca, token: &str) -> CaClient {
    let roots = tls::load_trust_bundle(&ca.dir.path().join("trust-bundle.pem")).unwrap();
    CaClient::new(
        ca.addr.to_string(),
        "nodemesh-ca".try_into().unwrap(),
        tls::ca_client_config(roots).unwrap(),
        token_file(ca, token),
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
            uid: Some("u1".into()),
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
async fn a_client_that_does_not_trust_the_ca_root_fails_the_handshake() {
    let ca = start_ca(3600).await;
    let elsewhere = tempfile::tempdir().unwrap();
    issuer::init_ca(elsewhere.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
    let roots = tls::load_trust_bundle(&elsewhere.path().join("trust-bundle.pem")).unwrap();
    let client = CaClient::new(
        ca.addr.to_string(),
        "nodemesh-ca".try_into().unwrap(),
        tls::ca_client_config(roots).unwrap(),
        token_file(&ca, TOKEN_NODE1),
    );
    let result = client
        .sign(&SignRequest {
            namespace: "shop".into(),
            pod: "web-1".into(),
            uid: Some("u1".into()),
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
    let pod = pod_ref("web-1", "u1");
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
    manager.set_desired([(db, pod_ref("db-1", "u2"))].into());
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

/// A workload certificate signed by the test CA's issuer, valid from `from` to `until`
/// (seconds relative to now; negative is the past).
fn workload_cert(
    ca: &Ca,
    id: &str,
    from: i64,
    until: i64,
) -> (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let dir = ca.dir.path();
    let issuer_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.join("issuer-key.pem")).unwrap()).unwrap();
    let issuer_pem = std::fs::read_to_string(dir.join("issuer-cert.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(until);
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let chain =
        tls::certificates_from_pem("test", format!("{}{issuer_pem}", leaf.pem()).as_bytes())
            .unwrap();
    (
        chain,
        tls::private_key_from_pem("test", key.serialize_pem().as_bytes()).unwrap(),
    )
}

/// Runs one HBONE-style handshake over loopback; returns the client's and server's outcome.
async fn handshake(
    client: Option<rustls::ClientConfig>,
    server: rustls::ServerConfig,
) -> (
    Result<Option<rustls::NamedGroup>, String>,
    Result<(), String>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor
            .accept(tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let client = client.expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client_side = match tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
    {
        Ok(mut stream) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let group = stream
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name());
            // TLS 1.3 client authentication completes with the server's first read.
            let _ = stream.write_all(b"x").await;
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            Ok(group)
        }
        Err(error) => Err(error.to_string()),
    };
    (client_side, server_side.await.unwrap())
}

fn roots(ca: &Ca) -> Arc<rustls::RootCertStore> {
    Arc::new(tls::load_trust_bundle(&ca.dir.path().join("trust-bundle.pem")).unwrap())
}

#[tokio::test]
async fn hbone_tls_negotiates_the_hybrid_post_quantum_group_and_verifies_both_identities() {
    let ca = start_ca(3600).await;
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let (client_chain, client_key) = workload_cert(&ca, web, -60, 3600);
    let (server_chain, server_key) = workload_cert(&ca, db, -60, 3600);
    let server = || {
        tls::hbone_server_config(server_chain.clone(), server_key.clone_key(), roots(&ca)).unwrap()
    };
    let client = |expected: &str| {
        Some(
            tls::hbone_client_config(
                client_chain.clone(),
                client_key.clone_key(),
                roots(&ca),
                expected.parse().unwrap(),
            )
            .unwrap(),
        )
    };

    let (client_side, server_side) = handshake(client(db), server()).await;
    assert_eq!(
        client_side,
        Ok(Some(rustls::NamedGroup::X25519MLKEM768)),
        "hybrid key exchange preferred"
    );
    assert_eq!(server_side, Ok(()));

    // The server holds db's certificate; a client expecting web must refuse it.
    let (client_side, _) = handshake(client(web), server()).await;
    let error = client_side.unwrap_err();
    assert!(error.contains("peer presented spiffe://cluster.local/ns/shop/sa/db, expected spiffe://cluster.local/ns/shop/sa/web"), "{error}");
}

#[tokio::test]
async fn hbone_tls_refuses_expired_and_foreign_certificates() {
    let ca = start_ca(3600).await;
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let (server_chain, server_key) = workload_cert(&ca, db, -60, 3600);
    let server = || {
        tls::hbone_server_config(server_chain.clone(), server_key.clone_key(), roots(&ca)).unwrap()
    };

    // A client whose certificate expired a minute ago.
    let (expired_chain, expired_key) =
        workload_cert(&ca, "spiffe://cluster.local/ns/shop/sa/web", -3600, -60);
    let client =
        tls::hbone_client_config(expired_chain, expired_key, roots(&ca), db.parse().unwrap())
            .unwrap();
    let (_, server_side) = handshake(Some(client), server()).await;
    let error = server_side.unwrap_err();
    assert!(error.to_lowercase().contains("expired"), "{error}");

    // A client from another CA.
    let other = start_ca(3600).await;
    let (foreign_chain, foreign_key) =
        workload_cert(&other, "spiffe://cluster.local/ns/shop/sa/web", -60, 3600);
    let client =
        tls::hbone_client_config(foreign_chain, foreign_key, roots(&ca), db.parse().unwrap())
            .unwrap();
    let (_, server_side) = handshake(Some(client), server()).await;
    let error = server_side.unwrap_err();
    // Both test CAs name their issuer alike, so the chain resolves to our issuer and the
    // signature check fails (BadSignature); a differently named CA gives UnknownIssuer.
    assert!(error.contains("invalid peer certificate"), "{error}");

    // A server whose certificate expired is refused by the client.
    let (old_chain, old_key) = workload_cert(&ca, db, -3600, -60);
    let (web_chain, web_key) =
        workload_cert(&ca, "spiffe://cluster.local/ns/shop/sa/web", -60, 3600);
    let client =
        tls::hbone_client_config(web_chain, web_key, roots(&ca), db.parse().unwrap()).unwrap();
    let expired_server = tls::hbone_server_config(old_chain, old_key, roots(&ca)).unwrap();
    let (client_side, _) = handshake(Some(client), expired_server).await;
    assert!(client_side.unwrap_err().to_lowercase().contains("expired"));
}

#[tokio::test]
async fn a_bundle_with_two_roots_lets_both_generations_talk_during_a_root_rotation() {
    // The old root and the new one, both in every trust bundle while workloads move over.
    let old = start_ca(3600).await;
    let new = start_ca(3600).await;
    let mut bundle = std::fs::read(old.dir.path().join("trust-bundle.pem")).unwrap();
    bundle.extend(std::fs::read(new.dir.path().join("trust-bundle.pem")).unwrap());
    let both = Arc::new(tls::trust_bundle_from_pem("rotation bundle", &bundle).unwrap());
    assert_eq!(both.len(), 2);

    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let (server_chain, server_key) = workload_cert(&old, db, -60, 3600);
    let (client_chain, client_key) =
        workload_cert(&new, "spiffe://cluster.local/ns/shop/sa/web", -60, 3600);
    let server = || {
        tls::hbone_server_config(
            server_chain.clone(),
            server_key.clone_key(),
            Arc::clone(&both),
        )
        .unwrap()
    };
    let client = |roots: Arc<rustls::RootCertStore>| {
        Some(
            tls::hbone_client_config(
                client_chain.clone(),
                client_key.clone_key(),
                roots,
                db.parse().unwrap(),
            )
            .unwrap(),
        )
    };
    let (client_side, server_side) = handshake(client(Arc::clone(&both)), server()).await;
    assert!(client_side.is_ok(), "{client_side:?}");
    assert_eq!(server_side, Ok(()), "a new-root client is accepted");

    // Without the old root in its bundle, the new-generation client refuses the old server.
    let (client_side, _) = handshake(client(roots(&new)), server()).await;
    assert!(client_side.is_err());
}
