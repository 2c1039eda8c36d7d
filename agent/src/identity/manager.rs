//! One certificate per identity present on this node: a key generated in memory (never
//! written anywhere), a CSR to the CA, renewal at 70% of the certificate's lifetime, and
//! release when the last pod with that identity leaves the node.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, KeyPair};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use super::{
    ca_client::{CaClient, SignRequest},
    spiffe::SpiffeId,
    tls,
};

/// Fraction of a certificate's lifetime after which it is renewed.
const RENEW_AT: f64 = 0.7;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A pod that carries an identity: the CA authorises a request through it, and checks that
/// it is still the pod the agent enrolled by its UID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Ca(#[from] super::ca_client::CaClientError),
    #[error("the CA's certificate: {0}")]
    Certificate(#[from] tls::TlsError),
    #[error("the CA issued {got} for a request for {wanted}")]
    WrongIdentity {
        wanted: Box<SpiffeId>,
        got: Box<SpiffeId>,
    },
}

/// A workload certificate and its key, in memory only.
pub struct WorkloadCertificate {
    pub chain_pem: String,
    key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// The chain and key in the form TLS wants them.
    pub fn tls_material(
        &self,
    ) -> Result<
        (
            Vec<rustls_pki_types::CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        tls::TlsError,
    > {
        Ok((
            tls::certificates_from_pem("workload certificate", self.chain_pem.as_bytes())?,
            tls::private_key_from_pem("workload key", self.key_pem.as_bytes())?,
        ))
    }

    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime.mul_f64(RENEW_AT)
    }
}

/// An identity as the config dump shows it.
#[derive(Clone, Debug, Serialize)]
pub struct IdentityView {
    pub spiffe_id: SpiffeId,
    pub not_before_unix: Option<u64>,
    pub not_after_unix: Option<u64>,
    pub renew_at_unix: Option<u64>,
    pub renewals: u64,
    pub last_error: Option<String>,
    /// Leaf and issuer, PEM (public; the key never leaves the agent's memory).
    pub certificate_chain: Option<String>,
}

struct Slot {
    pod: PodRef,
    certificate: Option<Arc<WorkloadCertificate>>,
    renewals: u64,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<String>,
}

pub struct IdentityManager {
    client: CaClient,
    slots: Mutex<BTreeMap<SpiffeId, Slot>>,
    wake: Notify,
    /// Bumped whenever a certificate is stored, for `wait_held`.
    issued: watch::Sender<u64>,
}

impl IdentityManager {
    pub fn new(client: CaClient) -> Arc<Self> {
        Arc::new(Self {
            client,
            slots: Mutex::default(),
            wake: Notify::new(),
            issued: watch::Sender::new(0),
        })
    }

    /// The identities this node needs, each with one of its local pods.
    pub fn set_desired(&self, desired: BTreeMap<SpiffeId, PodRef>) {
        let mut slots = self.lock();
        slots.retain(|id, _| {
            let keep = desired.contains_key(id);
            if !keep {
                tracing::info!(spiffe_id = %id, "identity released: its last pod left the node");
            }
            keep
        });
        for (id, pod) in desired {
            slots
                .entry(id)
                .and_modify(|slot| slot.pod = pod.clone())
                .or_insert(Slot {
                    pod,
                    certificate: None,
                    renewals: 0,
                    failures: 0,
                    retry_at: None,
                    last_error: None,
                });
        }
        drop(slots);
        self.wake.notify_one();
    }

    /// Resolves once a certificate of `id` is held.
    pub async fn wait_held(&self, id: &SpiffeId) {
        let mut issued = self.issued.subscribe();
        while self.certificate(id).is_none() {
            // The sender lives as long as `self`.
            if issued.changed().await.is_err() {
                return;
            }
        }
    }

    /// The current certificate of an identity, if one is held and has not expired. (After
    /// a CA outage longer than a certificate's remaining life there is none: nothing is sent
    /// or accepted with an expired identity; docs/security.md.)
    pub fn certificate(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let now = SystemTime::now();
        self.lock()
            .get(id)
            .and_then(|slot| slot.certificate.clone())
            .filter(|certificate| certificate.not_after > now)
    }

    /// True when every wanted identity has a valid certificate.
    pub fn all_held(&self) -> bool {
        let now = SystemTime::now();
        self.lock()
            .values()
            .all(|slot| slot.certificate.as_ref().is_some_and(|c| c.not_after > now))
    }

    /// When the first of the certificates held expires.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.lock()
            .values()
            .filter_map(|slot| slot.certificate.as_ref().map(|c| c.not_after))
            .min()
    }

    pub fn views(&self) -> Vec<IdentityView> {
        self.lock()
            .iter()
            .map(|(id, slot)| IdentityView {
                spiffe_id: id.clone(),
                not_before_unix: slot.certificate.as_ref().map(|c| unix(c.not_before)),
                not_after_unix: slot.certificate.as_ref().map(|c| unix(c.not_after)),
                renew_at_unix: slot.certificate.as_ref().map(|c| unix(c.renew_at())),
                renewals: slot.renewals,
                last_error: slot.last_error.clone(),
                certificate_chain: slot.certificate.as_ref().map(|c| c.chain_pem.clone()),
            })
            .collect()
    }

    /// Fetches and renews certificates until the agent stops.
    pub async fn run(self: Arc<Self>) {
        loop {
            for (id, pod) in self.due(SystemTime::now()) {
                let outcome = self.fetch(&id, &pod).await;
                self.record(&id, outcome);
            }
            let wait = self.next_due(SystemTime::now());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    fn due(&self, now: SystemTime) -> Vec<(SpiffeId, PodRef)> {
        self.lock()
            .iter()
            .filter(|(_, slot)| slot_due_at(slot) <= now)
            .map(|(id, slot)| (id.clone(), slot.pod.clone()))
            .collect()
    }

    fn next_due(&self, now: SystemTime) -> Duration {
        self.lock()
            .values()
            .map(|slot| slot_due_at(slot).duration_since(now).unwrap_or_default())
            .min()
            .unwrap_or(RETRY_MAX)
    }

    fn record(&self, id: &SpiffeId, outcome: Result<WorkloadCertificate, IdentityError>) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(id) else {
            return;
        };
        match outcome {
            Ok(certificate) => {
                tracing::info!(spiffe_id = %id, not_after_unix = unix(certificate.not_after), renewal = slot.certificate.is_some(), "certificate held");
                if slot.certificate.is_some() {
                    slot.renewals += 1;
                }
                slot.certificate = Some(Arc::new(certificate));
                slot.failures = 0;
                slot.retry_at = None;
                slot.last_error = None;
                self.issued.send_modify(|n| *n += 1);
            }
            Err(error) => {
                let backoff = RETRY_MIN
                    .saturating_mul(1 << slot.failures.min(6))
                    .min(RETRY_MAX);
                tracing::warn!(spiffe_id = %id, %error, retry_in = ?backoff, "certificate request failed");
                slot.failures += 1;
                slot.retry_at = Some(SystemTime::now() + backoff);
                slot.last_error = Some(error.to_string());
            }
        }
    }

    async fn fetch(
        &self,
        id: &SpiffeId,
        pod: &PodRef,
    ) -> Result<WorkloadCertificate, IdentityError> {
        let key = KeyPair::generate()?;
        let csr = CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let response = self
            .client
            .sign(&SignRequest {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                uid: Some(pod.uid.clone()),
                csr,
            })
            .await?;
        let chain = tls::certificates_from_pem(
            "certificate from the CA",
            response.certificate_chain.as_bytes(),
        )?;
        let got = tls::spiffe_id_of(&chain[0])?;
        if &got != id {
            return Err(IdentityError::WrongIdentity {
                wanted: Box::new(id.clone()),
                got: Box::new(got),
            });
        }
        let (not_before, not_after) = validity(&chain[0])?;
        Ok(WorkloadCertificate {
            chain_pem: response.certificate_chain,
            key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn slot_due_at(slot: &Slot) -> SystemTime {
    match (&slot.certificate, slot.retry_at) {
        (_, Some(retry_at)) => retry_at,
        (Some(certificate), None) => certificate.renew_at(),
        (None, None) => UNIX_EPOCH,
    }
}

fn validity(
    cert: &rustls_pki_types::CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime), IdentityError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| tls::TlsError::X509(e.to_string()))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(parsed.validity().not_before.timestamp()),
        at(parsed.validity().not_after.timestamp()),
    ))
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
