//! TLS building blocks shared by the CA service, the CA client and (next) HBONE: TLS 1.3 only,
//! the post-quantum hybrid key exchange preferred, PEM loading, SPIFFE IDs from certificates.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{RootCertStore, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::spiffe::{SpiffeId, SpiffeIdError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: bad PEM: {source}")]
    Pem {
        what: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: certificate rejected as a trust anchor: {source}")]
    Anchor { what: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    #[error("certificate carries no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate carries {0} spiffe:// URI SANs; an X.509-SVID has exactly one")]
    SeveralSpiffeIds(usize),
    #[error("certificate's SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),
}

/// The crypto provider: aws-lc-rs with key exchange groups ordered X25519MLKEM768 (hybrid
/// post-quantum) first, then the classical X25519 and P-256 as fallbacks.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let mut provider = default_provider();
    provider.kx_groups = vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
    ];
    Arc::new(provider)
}

pub fn certificates_from_pem(
    what: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

pub fn private_key_from_pem(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| TlsError::Pem {
        what: what.to_owned(),
        source,
    })
}

/// A trust bundle file: one or more root certificates (several during a root rotation).
pub fn load_trust_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    trust_bundle_from_pem(&path.display().to_string(), &pem)
}

pub fn trust_bundle_from_pem(what: &str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates_from_pem(what, pem)? {
        roots.add(cert).map_err(|source| TlsError::Anchor {
            what: what.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The single SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::X509(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(TlsError::NoSpiffeId),
        [uri] => Ok(uri.parse()?),
        many => Err(TlsError::SeveralSpiffeIds(many.len())),
    }
}

/// Server side of the CA's HTTPS endpoint: TLS 1.3, no client certificates (agents
/// authenticate with their ServiceAccount token).
pub fn ca_server_config(chain_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates_from_pem("CA serving certificate", chain_pem.as_bytes())?;
    let key = private_key_from_pem("CA serving key", key_pem.as_bytes())?;
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?)
}

/// Client side of the CA's HTTPS endpoint: trusts exactly the trust bundle.
pub fn ca_client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// ALPN of HBONE: HTTP/2.
pub const HBONE_ALPN: &[u8] = b"h2";

/// Verifies an HBONE server: its chain must lead to the trust bundle and its certificate
/// must carry exactly the SPIFFE ID the client expects for the destination.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented =
            spiffe_id_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if presented != self.expected {
            return Err(rustls::Error::General(format!(
                "peer presented {presented}, expected {}",
                self.expected
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side of HBONE: presents the source workload's certificate, accepts only a server
/// holding `expected`.
pub fn hbone_client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected,
        provider: Arc::clone(&provider),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    Ok(config)
}

/// Server side of HBONE: presents the destination workload's certificate and requires a
/// client certificate that chains to the trust bundle (its SPIFFE ID is checked after the
/// handshake, where the error can be reported).
pub fn hbone_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    Ok(config)
}
