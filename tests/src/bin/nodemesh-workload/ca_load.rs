//! `ca-load`: certificate requests against `nodemesh ca serve`, made the way agents make them.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::{net::TcpStream, task::JoinSet};
use tokio_rustls::TlsConnector;

#[derive(clap::Args)]
pub struct CaLoadArgs {
    #[arg(long)]
    ca: SocketAddr,
    #[arg(long, default_value = "nodemesh-ca")]
    server_name: String,
    #[arg(long)]
    trust_bundle: std::path::PathBuf,
    #[arg(long)]
    token_file: std::path::PathBuf,
    /// `namespace/name` of a pod on the token's node.
    #[arg(long)]
    pod: String,
    /// That pod's UID.
    #[arg(long)]
    pod_uid: String,
    #[arg(long)]
    requests: usize,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

/// The load `args` describe.
pub async fn run_args(args: &CaLoadArgs) -> anyhow::Result<()> {
    let pod = (args.pod.as_str(), args.pod_uid.as_str());
    let load = Load::new(
        args.ca,
        &args.server_name,
        &args.trust_bundle,
        &args.token_file,
        pod,
    )?;
    load.run(args.requests, args.concurrency).await
}

pub struct Load {
    ca: SocketAddr,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    token: String,
    namespace: String,
    pod: String,
    uid: String,
}

impl Load {
    pub fn new(
        ca: SocketAddr,
        server_name: &str,
        trust_bundle: &Path,
        token_file: &Path,
        (pod, uid): (&str, &str),
    ) -> anyhow::Result<Arc<Self>> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(trust_bundle)
            .with_context(|| format!("reading {}", trust_bundle.display()))?
        {
            roots.add(cert.context("trust bundle certificate")?)?;
        }
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_owned();
        let (namespace, pod) = pod.split_once('/').context("--pod is namespace/name")?;
        Ok(Arc::new(Self {
            ca,
            server_name: ServerName::try_from(server_name.to_owned())?,
            connector: TlsConnector::from(Arc::new(config)),
            token,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            uid: uid.to_owned(),
        }))
    }

    /// One request: key pair, CSR, TLS connection, POST, a 200 with a certificate chain.
    async fn request(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let key = KeyPair::generate()?;
        let csr = CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let body =
            json!({"namespace": self.namespace, "pod": self.pod, "uid": self.uid, "csr": csr});
        let tcp = TcpStream::connect(self.ca).await?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/certificates")
            .header("host", "nodemesh-ca")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let answer = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("CA answered {status}: {}", String::from_utf8_lossy(&answer));
        }
        let signed: serde_json::Value = serde_json::from_slice(&answer)?;
        let chain = signed["certificate_chain"]
            .as_str()
            .with_context(|| format!("CA answered without a certificate chain: {signed}"))?;
        // A certificate for this request's key, not one made earlier: the rate counts
        // signatures.
        let leaf = CertificateDer::from_pem_slice(chain.as_bytes())
            .context("the chain's first certificate")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| anyhow::anyhow!("parsing the issued certificate: {e}"))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            bail!("the CA issued a certificate for another key than the CSR's");
        }
        Ok(started.elapsed())
    }

    pub async fn run(self: Arc<Self>, requests: usize, concurrency: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut workers = JoinSet::new();
        let concurrency = concurrency.max(1);
        for worker in 0..concurrency {
            let load = Arc::clone(&self);
            let share = requests / concurrency + usize::from(worker < requests % concurrency);
            workers.spawn(async move {
                let mut latencies = Vec::with_capacity(share);
                for _ in 0..share {
                    latencies.push(load.request().await?);
                }
                Ok::<_, anyhow::Error>(latencies)
            });
        }
        let mut latencies = Vec::with_capacity(requests);
        while let Some(joined) = workers.join_next().await {
            latencies.extend(joined.context("a worker panicked")??);
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let percentile = |p: f64| crate::http_client::percentile_us(&latencies, p);
        println!(
            "{}",
            json!({
                "requests": latencies.len(),
                "concurrency": concurrency,
                "per_second": latencies.len() as f64 / elapsed.as_secs_f64(),
                "p50_us": percentile(0.50),
                "p99_us": percentile(0.99),
            })
        );
        Ok(())
    }
}
