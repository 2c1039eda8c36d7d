//! Mutual TLS on the testbed. Identities: `nodemesh ca serve` runs as a pod (as its Deployment
//! would), each node agent authenticates with its own token, and gets, renews and releases
//! certificates for exactly the identities of its own meshed pods. HBONE: traffic between
//! meshed pods crosses the wire only inside mTLS, checked with a packet capture; bad peers
//! are refused. Needs root.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nodemesh_testbed::{
    AgentOptions, ClusterMode, MeshCa, Testbed, TestbedConfig, TopologySpec, is_root, scaled,
    wait_until, workspace_bin,
};
use serde_json::Value;

struct Mesh {
    tb: Testbed,
    ca: MeshCa,
}

/// The standard testbed plus a CA pod on node1, with the CA started and listening.
fn mesh_with_ca(cert_ttl_seconds: u64) -> Mesh {
    assert!(
        is_root(),
        "kernel tests need root: run `cargo xtask test` as root"
    );
    let topology = TopologySpec::standard_with_ca();
    let config = TestbedConfig {
        prefix: "nmid".into(),
        nodemesh_bin: workspace_bin("nodemesh"),
        workload_bin: workspace_bin("nodemesh-workload"),
        log_dir: None,
        cluster: ClusterMode::from_env_or(ClusterMode::ApiServer),
        chart_values: Vec::new(),
    };
    let tb = Testbed::create(config, topology).expect("create testbed");
    let ca_pod = tb.pod("nodemesh-system", "ca").clone();
    let ca = tb
        .start_ca(&ca_pod, cert_ttl_seconds)
        .expect("start the CA");
    Mesh { tb, ca }
}

/// Agent options using the CA with `token_node`'s token.
fn agent_options(mesh: &Mesh, token_node: &str) -> AgentOptions {
    AgentOptions {
        extra_args: mesh.ca.agent_args_with_token_of(token_node),
        ..Default::default()
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn identities(tb: &Testbed, node: &str) -> BTreeMap<String, Value> {
    let dump = tb.admin_json(node, "/config_dump").expect("config dump");
    identities_in(&dump)
}

fn identities_in(dump: &Value) -> BTreeMap<String, Value> {
    dump["identities"]
        .as_array()
        .expect("identities listed when a CA is configured")
        .iter()
        .map(|i| {
            (
                i["spiffe_id"].as_str().unwrap_or_default().to_owned(),
                i.clone(),
            )
        })
        .collect()
}

fn ca_log(mesh: &Mesh) -> String {
    mesh.ca.log()
}

#[test]
fn each_node_holds_exactly_its_own_pods_identities_and_renews_them() {
    let mesh = mesh_with_ca(4);
    for (node, token) in [("node1", "node1"), ("node2", "node2")] {
        // start_agent waits for /readyz, which requires every identity's certificate.
        mesh.tb
            .start_agent(node, &agent_options(&mesh, token))
            .expect("agent ready with certificates");
    }
    let node1 = identities(&mesh.tb, "node1");
    assert_eq!(
        node1.keys().collect::<Vec<_>>(),
        [
            "spiffe://cluster.local/ns/mesh/sa/client-a",
            "spiffe://cluster.local/ns/mesh/sa/server-a"
        ],
        "node1 holds its meshed pods' identities only (not the outsider's, not the CA's, not node2's)"
    );
    let node2 = identities(&mesh.tb, "node2");
    assert_eq!(
        node2.keys().collect::<Vec<_>>(),
        [
            "spiffe://cluster.local/ns/mesh/sa/client-b",
            "spiffe://cluster.local/ns/mesh/sa/server-b"
        ]
    );
    let chain = node1["spiffe://cluster.local/ns/mesh/sa/client-a"]["certificate_chain"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and issuer: {chain}"
    );
    assert!(
        ca_log(&mesh).contains("certificate issued"),
        "the CA logs every issuance: {}",
        ca_log(&mesh)
    );

    // 4 s certificates are renewed at 70%: wait (bounded) until each has been renewed.
    wait_until(Duration::from_secs(20), "every identity renewed", || {
        Ok(identities(&mesh.tb, "node1")
            .values()
            .chain(identities(&mesh.tb, "node2").values())
            .all(|i| i["renewals"].as_u64() >= Some(1)))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", identities(&mesh.tb, "node1")));
    let (status, _) = mesh.tb.admin_get("node1", "/readyz").expect("readyz");
    assert_eq!(status, 200, "still ready across renewals");
}

#[test]
fn an_agent_cannot_obtain_another_nodes_identities() {
    let mesh = mesh_with_ca(3600);
    // node2's agent presents node1's token: the CA sees node1 asking for node2's pods.
    let options = AgentOptions {
        wait_ready: false,
        ..agent_options(&mesh, "node1")
    };
    let error = refused_with(&mesh, &options, "403");
    assert!(error.contains("not on the caller's node node1"), "{error}");
    assert!(
        ca_log(&mesh).contains("request refused"),
        "the CA logs the refusal: {}",
        ca_log(&mesh)
    );
}

/// Starts node2's agent presenting `token_file` to the CA and waits until every identity it
/// wants was refused with `status` (the CA answers 401 for every token it does not accept); returns the
/// refusal.
fn refused_with_token(mesh: &Mesh, token_file: &Path, status: &str) -> String {
    let options = AgentOptions {
        wait_ready: false,
        extra_args: mesh.ca.agent_args_with_token_file(token_file),
        ..Default::default()
    };
    refused_with(mesh, &options, status)
}

/// Starts node2's agent with `options` (not waited for) and waits until every identity it
/// wants was refused with `status`: no certificate held, not ready. Stops the agent and
/// returns the refusal.
fn refused_with(mesh: &Mesh, options: &AgentOptions, status: &str) -> String {
    mesh.tb
        .start_agent("node2", options)
        .expect("agent started");
    wait_until(Duration::from_secs(10), "refusal reported", || {
        // The agent was not waited for: its admin port may not be listening yet.
        let Ok(dump) = mesh.tb.admin_json("node2", "/config_dump") else {
            return Ok(false);
        };
        let ids = identities_in(&dump);
        Ok(!ids.is_empty()
            && ids
                .values()
                .all(|i| i["last_error"].as_str().is_some_and(|e| e.contains(status))))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", identities(&mesh.tb, "node2")));
    let node2 = identities(&mesh.tb, "node2");
    assert!(
        node2.values().all(|i| i["not_after_unix"].is_null()),
        "no certificate held: {node2:?}"
    );
    let (readyz, _) = mesh.tb.admin_get("node2", "/readyz").expect("readyz");
    assert_eq!(readyz, 503, "not ready without certificates");
    mesh.tb
        .kill_agent("node2", nodemesh_testbed::Signal::SIGKILL)
        .expect("stop the agent");
    node2
        .values()
        .next()
        .and_then(|i| i["last_error"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// What the real API server's TokenReview tells the CA: a token of the agents' own
/// ServiceAccount, bound to node2's agent Pod, but for the API server's audience instead of
/// `nodemesh`, is refused; so is a token with the right audience of another ServiceAccount
/// (a workload on node2 that minted one for itself).
#[test]
fn the_ca_refuses_tokens_for_another_audience_or_of_another_service_account() {
    let mesh = mesh_with_ca(3600);
    let api = mesh.tb.api().expect("a real API server");
    let dir = tempfile::tempdir().expect("tempdir");

    let api_audience = api
        .project_token(
            "nodemesh-system",
            "nodemesh-agent",
            (
                "nodemesh-agent-node2",
                mesh.tb.agent_pod_uid("node2").expect("agent pod"),
            ),
            &[],
            &dir.path().join("api-audience"),
        )
        .expect("token");
    let error = refused_with_token(&mesh, &api_audience, "401 Unauthorized");
    assert!(
        error.contains("token rejected by the API server"),
        "{error}"
    );
    assert!(
        error.contains("is invalid for the target audiences [\"nodemesh\"]"),
        "{error}"
    );

    let client_b = mesh.tb.pod("mesh", "client-b").clone();
    let workload = api
        .project_token(
            "mesh",
            client_b.service_account(),
            (client_b.name(), client_b.uid()),
            &["nodemesh"],
            &dir.path().join("workload"),
        )
        .expect("token");
    let error = refused_with_token(&mesh, &workload, "401 Unauthorized");
    assert!(
        error.contains(
            "token belongs to system:serviceaccount:mesh:client-b, not to the agent's ServiceAccount"
        ),
        "{error}"
    );
    assert!(
        ca_log(&mesh).contains("request refused"),
        "the CA logs the refusals: {}",
        ca_log(&mesh)
    );
}

#[test]
fn identities_are_released_when_their_pods_leave_the_mesh() {
    let mut mesh = mesh_with_ca(3600);
    mesh.tb
        .start_agent("node1", &agent_options(&mesh, "node1"))
        .expect("agent ready");
    assert_eq!(identities(&mesh.tb, "node1").len(), 2);
    mesh.tb
        .set_namespace_labels("mesh", BTreeMap::new())
        .expect("remove the mesh label");
    wait_until(Duration::from_secs(5), "identities released", || {
        Ok(identities(&mesh.tb, "node1").is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", identities(&mesh.tb, "node1")));
}

fn start_meshed_agents(mesh: &Mesh) {
    for (node, token) in [("node1", "node1"), ("node2", "node2")] {
        mesh.tb
            .start_agent(node, &agent_options(mesh, token))
            .expect("agent ready with certificates");
    }
}

fn run(tb: &Testbed, ns: &str, name: &str, program: &str, args: &[&str]) -> std::process::Output {
    let pod = tb.pod(ns, name).clone();
    let mut command = Command::new(program);
    command.args(args);
    tb.run_in_pod(&pod, command).expect("run in pod")
}

/// tcpdump on node1's port of the bridge between the nodes (a bridge device itself does not
/// see the frames it forwards between ports).
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(tb: &Testbed, dir: &Path) -> Capture {
        let file = dir.join("wire.pcap");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-br", tb.name()),
                "tcpdump",
                "-i",
                "n1",
                // Hand each packet over at once: without it packets wait in the kernel's
                // ring-buffer block, and stopping tcpdump drops them.
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
            ])
            .arg(&file)
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (installed by scripts/setup.sh)");
        // tcpdump says "listening on n1" once it captures: wait for that line.
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let listening = lines
            .by_ref()
            .take(5)
            .map_while(Result::ok)
            .any(|line| line.contains("listening on"));
        assert!(listening, "tcpdump did not start");
        Capture { child, file }
    }

    /// Stops the capture and returns the raw bytes captured.
    fn finish(mut self) -> Vec<u8> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("pcap written")
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn traffic_between_meshed_pods_is_encrypted_on_the_wire_and_delivered() {
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    mesh.tb
        .start_http_server(&server_b, 8080)
        .expect("http server");

    let capture = Capture::start(&mesh.tb, mesh.ca.dir());
    let secret = "NODEMESH-SECRET-MARKER-7f3a";
    let url = format!("http://{}:8080/{secret}", server_b.ipv4());
    let meshed = run(
        &mesh.tb,
        "mesh",
        "client-a",
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &url],
    );
    assert_eq!(
        String::from_utf8_lossy(&meshed.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&meshed.stderr)
    );
    let in_the_clear = "NODEMESH-PLAINTEXT-MARKER-91c2";
    let url = format!("http://{}:8080/{in_the_clear}", server_b.ipv4());
    let plain = run(
        &mesh.tb,
        "plain",
        "outsider",
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &url],
    );
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "200");
    let wire = capture.finish();

    assert!(
        contains(&wire, in_the_clear),
        "the capture sees plaintext of non-meshed traffic (sanity check of the capture; {} bytes captured)",
        wire.len()
    );
    assert!(
        !contains(&wire, secret),
        "meshed traffic crossed the wire in the clear"
    );

    // node2's HBONE server saw the connection from client-a's verified identity.
    let stats = mesh.tb.admin_json("node2", "/stats").expect("stats");
    let inbound: Vec<&Value> = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["source_pod"] == "spiffe://cluster.local/ns/mesh/sa/client-a")
        .collect();
    assert_eq!(inbound.len(), 1, "{stats}");
    assert_eq!(
        inbound[0]["destination"],
        format!("{}:8080", server_b.ipv4())
    );
}

#[test]
fn hbone_carries_ipv4_and_ipv6_byte_exact_with_the_dialled_peer() {
    let mesh = mesh_with_ca(3600);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    let mut echo = Command::new(mesh.tb.workload_bin());
    echo.args(["echo-server", "--ports", "7000"]);
    mesh.tb
        .spawn_in_pod(&server_b, echo)
        .expect("echo server")
        .detach();
    mesh.tb.wait_listening(&server_b, 7000).expect("listening");
    let workload = mesh.tb.workload_bin().display().to_string();
    for target in [
        format!("{}:7000", server_b.ipv4()),
        format!("[{}]:7000", server_b.ipv6()),
    ] {
        let out = run(
            &mesh.tb,
            "mesh",
            "client-a",
            &workload,
            &[
                "echo-client",
                "--target",
                &target,
                "--bytes",
                "262144",
                "--connections",
                "5",
            ],
        );
        assert!(
            out.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // node2 counts a connection's bytes as they pass and its close when both directions have
    // finished, which can be a moment after the client saw its echo: wait for the 10 closes.
    let from_client_a = |stats: &Value, field: &str| -> u64 {
        stats["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["source_pod"] == "spiffe://cluster.local/ns/mesh/sa/client-a")
            .map(|s| s[field].as_u64().unwrap_or(0))
            .sum()
    };
    let mut stats = Value::Null;
    wait_until(
        Duration::from_secs(10),
        "node2 to count the 10 connections closed",
        || {
            stats = mesh.tb.admin_json("node2", "/stats")?;
            Ok(from_client_a(&stats, "closed") == 10)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {stats}"));
    assert_eq!(
        from_client_a(&stats, "bytes_sent"),
        10 * 262144,
        "all 10 connections delivered through node2's HBONE server: {stats}"
    );
}

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

/// A certificate an agent held, as its config dump showed it.
#[derive(Debug, PartialEq)]
struct Held {
    serial: String,
    not_after_unix: u64,
}

fn held(identity: &Value) -> Option<Held> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let chain = identity["certificate_chain"].as_str()?;
    let leaf = CertificateDer::from_pem_slice(chain.as_bytes()).ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(Held {
        serial: parsed.raw_serial_as_string(),
        not_after_unix: identity["not_after_unix"].as_u64()?,
    })
}

/// What a sampler saw while traffic ran: every certificate each identity held, in order,
/// and for every HBONE connection from client-a (by local address) the client certificate
/// generation (index into client-a's certificates) current when it was first seen.
#[derive(Debug, Default)]
struct Observed {
    certificates: BTreeMap<String, Vec<Held>>,
    hbone_connections: BTreeMap<String, usize>,
}

impl Observed {
    fn sample(&mut self, tb: &Testbed, client_netns: &str, client_id: &str, hbone: &str) {
        // Connections first, then certificates: a connection seen here was made with a
        // certificate no newer than the one the dump below shows.
        let ss = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{client_netns}"))
            .args(["ss", "-Htn", "state", "established", "dst", hbone])
            .output()
            .expect("ss (iproute2)");
        let connections: Vec<String> = String::from_utf8_lossy(&ss.stdout)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let peer = fields.iter().position(|f| *f == hbone)?;
                Some(fields.get(peer.checked_sub(1)?)?.to_string())
            })
            .collect();
        for node in ["node1", "node2"] {
            let Ok(dump) = tb.admin_json(node, "/config_dump") else {
                continue;
            };
            for (id, identity) in identities_in(&dump) {
                let Some(now) = held(&identity) else { continue };
                let seen = self.certificates.entry(id).or_default();
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
            }
        }
        let generation = self
            .certificates
            .get(client_id)
            .map_or(0, |c| c.len().saturating_sub(1));
        for connection in connections {
            self.hbone_connections
                .entry(connection)
                .or_insert(generation);
        }
    }
}

#[test]
fn certificates_rotate_under_load_without_failing_a_connection() {
    // 4 s certificates renew every 2.8 s: 12 s of traffic spans at least 3 renewals of every
    // identity on both sides.
    let mesh = mesh_with_ca(4);
    start_meshed_agents(&mesh);
    let server_b = mesh.tb.pod("mesh", "server-b").clone();
    let client_a = mesh.tb.pod("mesh", "client-a").clone();
    let mut echo = Command::new(mesh.tb.workload_bin());
    echo.args(["echo-server", "--ports", "7000"]);
    mesh.tb
        .spawn_in_pod(&server_b, echo)
        .expect("echo server")
        .detach();
    mesh.tb.wait_listening(&server_b, 7000).expect("listening");
    let renewals = |node: &str, id: &str| {
        identities(&mesh.tb, node)[id]["renewals"]
            .as_u64()
            .expect("renewals")
    };
    let client_id = "spiffe://cluster.local/ns/mesh/sa/client-a";
    let server_id = "spiffe://cluster.local/ns/mesh/sa/server-b";
    let before = (renewals("node1", client_id), renewals("node2", server_id));

    let target = format!("{}:7000", server_b.ipv4());
    let hbone = format!("{}:15008", server_b.ipv4());
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let (soak, observed) = std::thread::scope(|scope| {
        let (tb, netns, hbone) = (&mesh.tb, client_a.netns(), &hbone);
        let sampler = scope.spawn(move || {
            let mut observed = Observed::default();
            // Every 100 ms until the soak is over (the sender is dropped).
            loop {
                observed.sample(tb, netns, client_id, hbone);
                match finished.recv_timeout(Duration::from_millis(100)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return observed,
                }
            }
        });
        let soak = run(
            &mesh.tb,
            "mesh",
            "client-a",
            mesh.tb.workload_bin().to_str().unwrap(),
            &[
                "soak",
                "--target",
                &target,
                "--long-lived",
                "4",
                "--duration-ms",
                "12000",
            ],
        );
        drop(done);
        (soak, sampler.join().expect("sampler"))
    });
    let summary: Value = serde_json::from_slice(&soak.stdout).unwrap_or_else(|_| {
        panic!(
            "soak output: {} {}",
            String::from_utf8_lossy(&soak.stdout),
            String::from_utf8_lossy(&soak.stderr)
        )
    });
    eprintln!("soak under rotation: {summary}");
    assert!(soak.status.success(), "failures under rotation: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["peer_mismatch"], 0, "{summary}");
    // About 8 short connections a second natively (100 over the run); an emulated kernel
    // (the VM matrix) runs slower by the time scale, and still crosses every renewal.
    let time_scale = scaled(Duration::from_secs(1)).as_secs_f64();
    let enough = (100.0 / time_scale) as u64;
    assert!(
        summary["short_connections"].as_u64().unwrap() >= enough,
        "enough short connections to cross every renewal: {summary}"
    );
    // Each long-lived connection exchanged (and checked) 1 KiB about every 50 ms for the
    // whole run, then closed cleanly: it outlived every certificate it started with.
    let each = summary["long_lived_exchanges_each"].as_array().unwrap();
    assert_eq!(each.len(), 4, "{summary}");
    assert!(
        each.iter().all(|n| n.as_u64().unwrap() >= enough),
        "every long-lived connection kept exchanging: {summary}"
    );

    // The rotation really happened during the traffic: each side held at least 4 distinct
    // certificates (3 changes of serial and expiry) while the sampler watched.
    eprintln!("certificates seen: {:#?}", observed.certificates);
    for id in [client_id, server_id] {
        let seen = &observed.certificates[id];
        assert!(
            seen.len() >= 4,
            "{id} changed certificate at least 3 times during the run: {seen:?}"
        );
        assert!(
            seen.windows(2)
                .all(|w| w[0].serial != w[1].serial && w[0].not_after_unix < w[1].not_after_unix),
            "each renewal brought a new serial and a later expiry: {seen:?}"
        );
    }
    // New streams used the renewed certificates: client-a's pool opened a new HBONE
    // connection under each certificate generation after the first.
    eprintln!(
        "HBONE connections (local address → client certificate generation): {:?}",
        observed.hbone_connections
    );
    let generations: std::collections::BTreeSet<usize> =
        observed.hbone_connections.values().copied().collect();
    assert!(
        generations.iter().filter(|g| **g > 0).count() >= 3,
        "client-a opened HBONE connections with at least 3 renewed certificates: {:?}",
        observed.hbone_connections
    );
    let after = (renewals("node1", client_id), renewals("node2", server_id));
    eprintln!("renewals (client-a, server-b): {before:?} -> {after:?}");
    assert!(
        after.0 >= before.0 + 3 && after.1 >= before.1 + 3,
        "both sides renewed at least 3 times during the run: {before:?} -> {after:?}"
    );
}
