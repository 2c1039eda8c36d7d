//! The CA's signing core: an intermediate issuer that turns a CSR into an X.509-SVID for an
//! identity the CA chose. Everything the CSR asks for besides its public key (subject, SANs,
//! extensions) is ignored; the signature on the CSR proves possession of the key. A workload
//! certificate lives at most [`MAX_WORKLOAD_TTL_SECONDS`], and never past its issuer.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::spiffe::SpiffeId;

/// The longest lifetime of a workload certificate: 7 days. A stolen key is good for at most
/// this long, and `--cert-ttl-seconds` cannot be set above it.
pub const MAX_WORKLOAD_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// Certificates start up to this long in the past, to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// Backdating is capped at a tenth of the lifetime, so that short-lived certificates (tests)
/// are still renewed at about 70% of the lifetime that was asked for.
fn backdate(ttl: Duration) -> Duration {
    BACKDATE.min(ttl / 10)
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM private key: {source}")]
    Key { path: PathBuf, source: rcgen::Error },
    #[error("{path}: not a usable PEM CA certificate: {source}")]
    Certificate { path: PathBuf, source: rcgen::Error },
    #[error("the CSR is not valid PEM: {0}")]
    CsrPem(rustls_pki_types::pem::Error),
    #[error("the CSR is not valid or its signature does not verify: {0}")]
    Csr(rcgen::Error),
    #[error("signing: {0}")]
    Sign(rcgen::Error),
    #[error(
        "a workload certificate may live at most {MAX_WORKLOAD_TTL_SECONDS} s, not {}",
        .0.as_secs()
    )]
    Lifetime(Duration),
    #[error(
        "the issuer certificate expired (not after {} s since the epoch): put a new issuer in the Secret",
        unix_seconds(*.0)
    )]
    IssuerExpired(SystemTime),
}

/// A signed workload certificate.
pub struct IssuedCertificate {
    /// Leaf followed by the issuer chain, PEM.
    pub chain_pem: String,
    pub serial: String,
    pub not_after: SystemTime,
}

/// Signs workload certificates with the intermediate loaded from the issuer Secret.
pub struct WorkloadIssuer {
    issuer: Issuer<'static, KeyPair>,
    /// The intermediate (and anything above it except the root), PEM, appended to leaves.
    chain_pem: String,
    /// When the intermediate expires: nothing it signs lives longer.
    not_after: SystemTime,
}

impl WorkloadIssuer {
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Self, IssuerError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| IssuerError::Key {
            path: key_path.to_owned(),
            source,
        })?;
        let certificate_error = |source| IssuerError::Certificate {
            path: cert_path.to_owned(),
            source,
        };
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(certificate_error)?;
        let not_after = not_after(&cert_pem).map_err(certificate_error)?;
        Ok(Self {
            issuer,
            chain_pem: cert_pem,
            not_after,
        })
    }

    /// When a certificate issued now for `ttl` expires: `ttl` from now, or when the issuer
    /// does if that is sooner.
    fn expiry(&self, now: SystemTime, ttl: Duration) -> Result<SystemTime, IssuerError> {
        if self.not_after <= now {
            return Err(IssuerError::IssuerExpired(self.not_after));
        }
        Ok((now + ttl).min(self.not_after))
    }

    /// Signs the CSR's public key into a certificate for `id`, valid for `ttl`.
    pub fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, IssuerError> {
        let csr_der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(IssuerError::CsrPem)?;
        let csr = CertificateSigningRequestParams::from_der(&csr_der).map_err(IssuerError::Csr)?;
        if ttl > Duration::from_secs(MAX_WORKLOAD_TTL_SECONDS) {
            return Err(IssuerError::Lifetime(ttl));
        }
        let now = SystemTime::now();
        let not_after = self.expiry(now, ttl)?;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.not_before = OffsetDateTime::from(now - backdate(ttl));
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "nodemesh");
        params.subject_alt_names = vec![SanType::URI(
            id.to_string().try_into().map_err(IssuerError::Sign)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(IssuerError::Sign)?;
        Ok(IssuedCertificate {
            chain_pem: format!("{}{}", leaf.pem(), self.chain_pem),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after,
        })
    }

    /// A TLS serving certificate for the CA service itself (DNS names and/or IPs).
    pub fn serving_certificate(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, KeyPair), IssuerError> {
        let key = KeyPair::generate().map_err(IssuerError::Sign)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(IssuerError::Sign)?;
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - backdate(ttl));
        params.not_after = OffsetDateTime::from(self.expiry(now, ttl)?);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IssuerError::Sign)?;
        Ok((format!("{}{}", cert.pem(), self.chain_pem), key))
    }
}

fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    // The TLS provider's CSPRNG; it only fails if the kernel cannot supply randomness.
    if crate::identity::tls::provider()
        .secure_random
        .fill(&mut serial)
        .is_err()
    {
        tracing::error!("no randomness for a certificate serial number; aborting");
        std::process::abort();
    }
    serial[0] &= 0x7f; // positive ASN.1 INTEGER
    serial
}

/// The end of the validity of the first certificate in `pem`.
fn not_after(pem: &str) -> Result<SystemTime, rcgen::Error> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    let (_, certificate) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    let seconds = certificate.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read(path: &Path) -> Result<String, IssuerError> {
    std::fs::read_to_string(path).map_err(|source| IssuerError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Files `nodemesh ca init` writes.
pub struct CaFiles {
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    pub trust_bundle: PathBuf,
}

/// Creates a root and an intermediate issuer under `dir` (for tests and evaluation; in a
/// cluster the root key stays offline and only the issuer goes into a Secret).
pub fn init_ca(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<CaFiles, IssuerError> {
    std::fs::create_dir_all(dir).map_err(|source| IssuerError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let now = SystemTime::now();
    let ca_params = |common_name: String, path_len: u8| {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "nodemesh");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::from(now - backdate(ttl));
        params.not_after = OffsetDateTime::from(now + ttl);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        params
    };
    let root_key = KeyPair::generate().map_err(IssuerError::Sign)?;
    let root_params = ca_params(format!("nodemesh root {trust_domain}"), 1);
    let root_cert = root_params
        .self_signed(&root_key)
        .map_err(IssuerError::Sign)?;
    let root = Issuer::new(root_params, root_key);
    let issuer_key = KeyPair::generate().map_err(IssuerError::Sign)?;
    let issuer_cert = ca_params(format!("nodemesh issuer {trust_domain}"), 0)
        .signed_by(&issuer_key, &root)
        .map_err(IssuerError::Sign)?;
    let files = CaFiles {
        root_cert: dir.join("root-cert.pem"),
        root_key: dir.join("root-key.pem"),
        issuer_cert: dir.join("issuer-cert.pem"),
        issuer_key: dir.join("issuer-key.pem"),
        trust_bundle: dir.join("trust-bundle.pem"),
    };
    for (path, text) in [
        (&files.root_cert, root_cert.pem()),
        (&files.root_key, root.key().serialize_pem()),
        (&files.issuer_cert, issuer_cert.pem()),
        (&files.issuer_key, issuer_key.serialize_pem()),
        (&files.trust_bundle, root_cert.pem()),
    ] {
        write_private(path, &text)?;
    }
    Ok(files)
}

fn write_private(path: &Path, text: &str) -> Result<(), IssuerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| IssuerError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(write_error)
}
