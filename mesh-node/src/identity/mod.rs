//! Workload certificates (X.509 SVIDs) held by this node.
//!
//! For every identity of a workload placed here, the manager makes a key on this node, sends
//! only a CSR to the control plane, and keeps the signed certificate with its key in the
//! [`SvidStore`]. It renews each at half its life. A renewal replaces the entry; connections
//! that completed their handshake with the old certificate are unaffected, and new handshakes
//! pick up the new one. When the control plane is away the current certificates stay in use and
//! renewal is retried with backoff.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use mesh_api::v1::SignCertificateRequest;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use crate::control::{Backoff, CpClient, MeshView};

/// A certificate and its private key, ready for rustls.
#[derive(Debug)]
pub struct Svid {
    pub identity: String,
    pub certified: Arc<CertifiedKey>,
    pub serial: String,
    pub not_after: SystemTime,
    /// When the manager replaces it: half-way from receipt to expiry.
    pub renew_at: SystemTime,
}

/// Current certificates by SPIFFE ID. Written only by the manager.
#[derive(Debug, Default)]
pub struct SvidStore {
    by_identity: RwLock<BTreeMap<String, Arc<Svid>>>,
    stats: RwLock<SvidStats>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SvidStats {
    pub issued: u64,
    pub errors: u64,
}

impl SvidStore {
    pub fn get(&self, identity: &str) -> Option<Arc<Svid>> {
        self.read().get(identity).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Every certificate held, in identity order.
    pub fn all(&self) -> Vec<Arc<Svid>> {
        self.read().values().cloned().collect()
    }

    pub fn stats(&self) -> SvidStats {
        *self.stats.read().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Svid>>> {
        self.by_identity.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Svid>>> {
        self.by_identity.write().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut SvidStats)) {
        f(&mut self.stats.write().unwrap_or_else(|p| p.into_inner()));
    }
}

#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error("cannot make a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("{0}")]
    Client(#[from] crate::control::ControlError),
    #[error("control plane refused: {}", .0.message())]
    Refused(tonic::Status),
    #[error("the control plane's certificate is unusable: {0}")]
    BadCert(String),
}

/// Keeps the store holding a valid certificate for every local identity of the current view.
pub async fn run_manager(
    client: CpClient,
    mut view: watch::Receiver<Arc<MeshView>>,
    store: Arc<SvidStore>,
) {
    let mut retry: BTreeMap<String, (SystemTime, Backoff)> = BTreeMap::new();
    loop {
        let wanted: BTreeSet<String> = view.borrow_and_update().local_identities(client.node());
        let removed: Vec<String> = store
            .read()
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in removed {
            store.write().remove(&id);
            tracing::info!(
                identity = id,
                "certificate dropped; no local workload has this identity any more"
            );
        }
        retry.retain(|id, _| wanted.contains(id));

        let now = SystemTime::now();
        for id in &wanted {
            let due = store.get(id).is_none_or(|s| s.renew_at <= now);
            let waiting = retry.get(id).is_some_and(|(at, _)| *at > now);
            if !due || waiting {
                continue;
            }
            match issue(&client, id).await {
                Ok(svid) => {
                    tracing::info!(identity = id, serial = svid.serial, not_after = %crate::access_log::rfc3339(svid.not_after), renew_in = ?svid.renew_at.duration_since(SystemTime::now()).unwrap_or_default(), "certificate obtained");
                    store.write().insert(id.clone(), Arc::new(svid));
                    store.count(|s| s.issued += 1);
                    retry.remove(id);
                }
                Err(e) => {
                    store.count(|s| s.errors += 1);
                    let entry = retry.entry(id.clone()).or_insert_with(|| {
                        (
                            now,
                            Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
                        )
                    });
                    let delay = entry.1.step();
                    entry.0 = SystemTime::now() + delay;
                    let current = store.get(id).map_or_else(
                        || "none".to_owned(),
                        |s| crate::access_log::rfc3339(s.not_after),
                    );
                    tracing::warn!(identity = id, retry_in = ?delay, current_not_after = %current, "cannot obtain a certificate: {e}");
                }
            }
        }

        // Sleep until the earliest renewal or retry, or until the view changes.
        let now = SystemTime::now();
        let next = wanted
            .iter()
            .filter_map(|id| {
                let renew = store.get(id).map(|s| s.renew_at);
                let again = retry.get(id).map(|(at, _)| *at);
                renew.into_iter().chain(again).max()
            })
            .min()
            .map(|t| t.duration_since(now).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(next) => {}
        }
    }
}

async fn issue(client: &CpClient, identity: &str) -> Result<Svid, IssueError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into()?)];
    let csr = params.serialize_request(&key)?;
    let received_at = SystemTime::now();
    let reply = client
        .api()?
        .sign_certificate(SignCertificateRequest {
            csr_der: csr.der().to_vec(),
            identity: identity.to_owned(),
        })
        .await
        .map_err(IssueError::Refused)?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = reply
        .cert_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| IssueError::BadCert("empty chain".into()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| IssueError::BadCert(e.to_string()))?;
    let uri_ok = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(
                |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == identity),
            )
        });
    if !uri_ok {
        return Err(IssueError::BadCert(format!("it is not for {identity}")));
    }
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
    let serial = parsed.raw_serial_as_string();
    let life = not_after.duration_since(received_at).unwrap_or_default();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key_der, &provider)
        .map_err(|e| IssueError::BadCert(e.to_string()))?;
    Ok(Svid {
        identity: identity.to_owned(),
        certified: Arc::new(certified),
        serial,
        not_after,
        renew_at: received_at + life / 2,
    })
}
