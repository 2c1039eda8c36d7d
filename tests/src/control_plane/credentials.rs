//! The control plane's credentials: its CA, the API server's serving certificate, the
//! ServiceAccount signing key, the admin's static token, and kubeconfigs.

use std::{fs::File, net::SocketAddr, path::Path};

use crate::error::{IoContext, Result, TestbedError};

const ADMIN_TOKEN_NAME: &str = "testbed-admin";

/// The cluster CA, the API server's serving certificate (for `api_server`), the
/// ServiceAccount signing key, the admin's static token and its kubeconfig.
pub(super) fn write_credentials(dir: &Path, api_server: SocketAddr) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let rcgen_error = |e: rcgen::Error| TestbedError::Other(format!("generating a key: {e}"));
    let ca_key = KeyPair::generate().map_err(rcgen_error)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "nodemesh testbed cluster CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rcgen_error)?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().map_err(rcgen_error)?;
    let mut serving = CertificateParams::new(vec![
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "localhost".to_owned(),
    ])
    .map_err(rcgen_error)?;
    serving
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(api_server.ip()));
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let serving_cert = serving.signed_by(&serving_key, &ca).map_err(rcgen_error)?;

    let sa_key = KeyPair::generate().map_err(rcgen_error)?;
    let admin_token = hex_token()?;
    let files = [
        ("ca.crt", ca_cert.pem()),
        ("apiserver.crt", serving_cert.pem()),
        ("apiserver.key", serving_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
        (
            "tokens.csv",
            format!("{admin_token},{ADMIN_TOKEN_NAME},{ADMIN_TOKEN_NAME},system:masters\n"),
        ),
        ("admin.token", admin_token),
    ];
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents).io_context(|| format!("writing {}", path.display()))?;
    }
    let url = format!("https://{api_server}");
    write_kubeconfig(
        &dir.join("admin.kubeconfig"),
        &url,
        &dir.join("ca.crt"),
        &dir.join("admin.token"),
    )
}

fn hex_token() -> Result<String> {
    let bytes = crate::util::random_bytes::<16>()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(super) fn write_kubeconfig(path: &Path, url: &str, ca: &Path, token_file: &Path) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {
            "server": url,
            "certificate-authority": ca.display().to_string(),
        }}],
        "users": [{"name": "user", "user": {"tokenFile": token_file.display().to_string()}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "user"}}],
        "current-context": "testbed",
    });
    let yaml = serde_yaml::to_string(&config).map_err(|source| TestbedError::Yaml {
        what: path.display().to_string(),
        source,
    })?;
    let mut file = File::create(path).io_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, yaml.as_bytes())
        .io_context(|| format!("writing {}", path.display()))
}
