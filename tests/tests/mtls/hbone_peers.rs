//! What an HBONE server accepts: clients without a mesh certificate are refused, and a
//! mesh client may CONNECT only to the destination pod's own addresses.

use super::*;

#[test]
fn hbone_refuses_clients_without_a_mesh_certificate() {
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    let hbone = format!("{}:15008", server_b.ipv4());
    // TLS 1.3 checks a client certificate after the client has finished its handshake, so
    // openssl is told to keep reading (-ign_eof) until the server answers with an alert.
    // No client certificate.
    let out = run(
        &mesh.tb,
        "plain",
        "outsider",
        "openssl",
        &[
            "s_client", "-connect", &hbone, "-alpn", "h2", "-brief", "-ign_eof",
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("alert certificate required"),
        "handshake without a client certificate must fail: {said}"
    );
    // A certificate from another CA.
    let other = tempfile::tempdir().expect("tempdir");
    let init = Command::new(mesh.tb.nodemesh_bin())
        .args(["ca", "init", "--dir"])
        .arg(other.path())
        .output()
        .expect("ca init");
    assert!(init.status.success());
    let cert = path(&other.path().join("issuer-cert.pem"));
    let key = path(&other.path().join("issuer-key.pem"));
    let out = run(
        &mesh.tb,
        "plain",
        "outsider",
        "openssl",
        &[
            "s_client", "-connect", &hbone, "-alpn", "h2", "-brief", "-ign_eof", "-cert", &cert,
            "-key", &key,
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("alert"),
        "a certificate from another CA must be refused: {said}"
    );

    wait_until(Duration::from_secs(5), "two rejections logged", || {
        Ok(mesh
            .tb
            .agent_log("node2")
            .matches("HBONE mTLS handshake rejected")
            .count()
            >= 2)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", mesh.tb.agent_log("node2")));
    assert!(mesh.tb.agent_running("node2"), "the agent keeps serving");
}

/// A mesh client of our own: a certificate for `spiffe_id` minted from the testbed CA's
/// issuer, TLS 1.3 with ALPN h2. It does not verify the server (this test is about what the
/// server accepts), which is why it is here and nowhere near the agent.
mod mesh_client {
    use std::{path::Path, sync::Arc};

    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    use rustls::{
        ClientConfig, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, aws_lc_rs, verify_tls12_signature, verify_tls13_signature},
    };
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

    #[derive(Debug)]
    struct AnyServer(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    pub fn config(ca_dir: &Path, spiffe_id: &str) -> ClientConfig {
        let read = |file: &str| std::fs::read_to_string(ca_dir.join(file)).expect(file);
        let issuer_pem = read("issuer-cert.pem");
        let issuer_key = KeyPair::from_pem(&read("issuer-key.pem")).expect("issuer key");
        let issuer = Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let leaf = params.signed_by(&key, &issuer).expect("sign");
        let issuer_der = CertificateDer::from_pem_slice(issuer_pem.as_bytes()).expect("issuer der");
        use rustls_pki_types::pem::PemObject;
        let provider = Arc::new(aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_client_auth_cert(
                vec![leaf.der().clone(), issuer_der],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("client certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }
}

/// What an HBONE server answered to one request; for a `200`, what an HTTP/1.1 GET sent
/// through the tunnel got back.
#[derive(Debug)]
struct Answer {
    status: u16,
    through_tunnel: Option<String>,
}

/// Sends `requests` (method, URI) one after the other on one mTLS HBONE connection from the
/// outsider pod (not meshed, so not captured) to `pod_ip`:15008, as `spiffe_id`.
fn hbone_requests(
    mesh: &Mesh,
    pod_ip: IpAddr,
    spiffe_id: &str,
    requests: &[(hyper::Method, String)],
) -> Vec<Answer> {
    let config = mesh_client::config(mesh.ca.dir(), spiffe_id);
    let outsider = mesh.tb.pod("plain", "outsider").clone();
    let tcp = mesh
        .tb
        .connect_from_pod(&outsider, SocketAddr::new(pod_ip, 15008))
        .expect("TCP to :15008");
    tcp.set_nonblocking(true).unwrap();
    let requests = requests.to_vec();
    let timeout = Duration::from_secs(5);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect("nodemesh.invalid".try_into().unwrap(), tcp)
                .await
                .expect("mTLS handshake");
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .expect("HTTP/2");
            tokio::spawn(connection);
            let mut answers = Vec::new();
            for (method, uri) in requests {
                let request = hyper::Request::builder()
                    .method(method)
                    .uri(&uri)
                    .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                    .unwrap();
                let response = tokio::time::timeout(timeout, sender.send_request(request))
                    .await
                    .unwrap_or_else(|_| panic!("no answer to {uri} within {timeout:?}"))
                    .unwrap_or_else(|e| panic!("{uri}: {e}"));
                let status = response.status().as_u16();
                let through_tunnel = if status == 200 {
                    let mut tunnel =
                        hyper_util::rt::TokioIo::new(hyper::upgrade::on(response).await.unwrap());
                    let exchange = async {
                        tunnel
                            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            .await?;
                        let mut reply = Vec::new();
                        tunnel.read_to_end(&mut reply).await.map(|_| reply)
                    };
                    let reply = tokio::time::timeout(timeout, exchange)
                        .await
                        .unwrap_or_else(|_| panic!("no reply through the tunnel to {uri}"))
                        .unwrap_or_else(|e| panic!("through the tunnel to {uri}: {e}"));
                    Some(String::from_utf8_lossy(&reply).into_owned())
                } else {
                    None
                };
                answers.push(Answer {
                    status,
                    through_tunnel,
                });
            }
            answers
        })
}

/// Whether one line of `log` contains every one of `needles`.
fn logged(log: &str, needles: &[&str]) -> bool {
    log.lines()
        .any(|line| needles.iter().all(|needle| line.contains(needle)))
}

/// The connection series node `node`'s proxy counted from `source` to `destination`.
fn series(tb: &Testbed, node: &str, source: &str, destination: &str) -> Option<Value> {
    let stats = tb.admin_json(node, "/stats").expect("stats");
    stats["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .find(|s| s["source_pod"] == source && s["destination"] == destination)
        .cloned()
}

#[test]
fn hbone_refuses_a_connect_to_an_address_that_is_not_the_destination_pod() {
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    mesh.tb
        .start_http_server(&server_b, 8080)
        .expect("http server");
    let server_a = mesh.tb.pod("mesh", "server-a").clone();
    // A valid mesh identity that no pod has, so every log line and counter with it is ours.
    let probe = "spiffe://cluster.local/ns/mesh/sa/hbone-probe";
    let client_a = "spiffe://cluster.local/ns/mesh/sa/client-a";
    let elsewhere_v4 = SocketAddr::new(server_a.ipv4().into(), 8080).to_string();
    let elsewhere_v6 = SocketAddr::new(server_a.ipv6().into(), 8080).to_string();
    let own_v4 = SocketAddr::new(server_b.ipv4().into(), 8080).to_string();
    let own_v6 = SocketAddr::new(server_b.ipv6().into(), 8080).to_string();
    let connect = |authority: &str| (hyper::Method::CONNECT, authority.to_owned());

    let answers = hbone_requests(
        &mesh,
        server_b.ipv4().into(),
        probe,
        &[
            connect(&elsewhere_v4),
            connect(&elsewhere_v6),
            connect("server-a.mesh:8080"),
            (hyper::Method::GET, format!("http://{own_v4}/")),
            connect(&own_v4),
            connect(&own_v6),
        ],
    );
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [403, 403, 400, 405, 200, 200],
        "another pod's IPv4 and IPv6 address are forbidden, a name is not ip:port, only \
         CONNECT is served, the pod's own addresses work (on the same HTTP/2 connection \
         after the refusals): {answers:?}"
    );
    for answer in &answers[4..] {
        let reply = answer.through_tunnel.as_deref().unwrap_or_default();
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with(&"x".repeat(1024)),
            "the application answered through the tunnel: {reply:?}"
        );
    }

    wait_until(Duration::from_secs(5), "the refusals logged", || {
        let log = mesh.tb.agent_log("node2");
        Ok([&elsewhere_v4, &elsewhere_v6].iter().all(|target| {
            logged(
                &log,
                &[
                    "CONNECT to an address that is not this meshed pod",
                    probe,
                    target,
                ],
            )
        }) && logged(&log, &["CONNECT authority is not ip:port", probe])
            && logged(&log, &["only CONNECT is served", probe]))
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", mesh.tb.agent_log("node2")));
    for target in [&elsewhere_v4, &elsewhere_v6] {
        assert_eq!(
            series(&mesh.tb, "node2", probe, target),
            None,
            "a refused CONNECT never reaches an application"
        );
    }

    // Afterwards the agent still serves the mesh: client-a's own connection, captured on
    // node1 and carried over HBONE, reaches server-b and is counted under its identity.
    assert!(mesh.tb.agent_running("node2"), "the agent keeps running");
    let meshed = run(
        &mesh.tb,
        "mesh",
        "client-a",
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{own_v4}/"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&meshed.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&meshed.stderr)
    );
    wait_until(
        Duration::from_secs(5),
        "client-a's connection counted",
        || {
            Ok(series(&mesh.tb, "node2", client_a, &own_v4)
                .is_some_and(|s| s["opened"] == 1 && s["closed"] == 1))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", mesh.tb.admin_json("node2", "/stats")));
}
