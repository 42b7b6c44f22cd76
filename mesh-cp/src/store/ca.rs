//! The mesh's CA kept in etcd, for replicas that are not each given it as files: the root
//! certificate in the clear and its private key sealed (ChaCha20-Poly1305) with a key every
//! replica is given (`--ca-encryption-key`, 32 bytes as 64 hex digits). Whoever reads etcd
//! without that key learns the root certificate, which is public anyway, and nothing else.
//!
//! Without a CA in the store, the leader makes one and writes it only if there is still
//! none; the other replicas wait for it. A stored CA that cannot be opened is an error, never
//! replaced: a new root would cut every certificate in the mesh from its root.

use std::{path::Path, time::Duration};

use base64::Engine as _;
use mesh_etcd::{ops, pb::TxnRequest};
use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN},
    rand::{SecureRandom as _, SystemRandom},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Store, StoreError};
use crate::ca::{Ca, CaError};

/// How often a replica that does not lead looks for the CA the leader makes.
const WAIT: Duration = Duration::from_secs(1);
/// The most bytes the stored CA may take.
const MAX_VALUE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreCaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--ca-encryption-key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the CA in etcd ({key}) cannot be opened: {reason}; it is never replaced (every certificate chains to it): give the key it was sealed with")]
    Sealed { key: String, reason: String },
    #[error("the CA in etcd ({key}): {0}", key = .1)]
    Ca(CaError, String),
    #[error("the system's random source failed")]
    Random,
    #[error("{0}")]
    Conflict(String),
}

impl From<mesh_etcd::Error> for StoreCaError {
    fn from(e: mesh_etcd::Error) -> Self {
        StoreCaError::Store(e.into())
    }
}

/// The key that seals the CA's private key.
pub struct SealingKey(LessSafeKey);

impl SealingKey {
    /// Reads 32 bytes written as 64 hex digits (`openssl rand -hex 32`).
    pub fn read(path: &Path) -> Result<Self, StoreCaError> {
        let bad = |reason: String| StoreCaError::Key {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let bytes = hex::decode(text.trim())
            .map_err(|_| bad("not hex digits (make one with `openssl rand -hex 32`)".into()))?;
        if bytes.len() != 32 {
            return Err(bad(format!(
                "{} bytes; it must be 32 (64 hex digits)",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| bad("not a ChaCha20-Poly1305 key".into()))?;
        Ok(Self(LessSafeKey::new(key)))
    }
}

/// What the store holds.
#[derive(Serialize, Deserialize)]
struct Stored {
    cert_pem: String,
    /// Base64 of the nonce followed by the sealed key PEM and its tag.
    key_sealed: String,
}

/// What a replica brings to the CA in the store besides its sealing key.
#[derive(Default)]
pub struct Known {
    /// A root and its key to put in etcd when it has none (`--ca-cert`, `--ca-key` with
    /// `--ca-encryption-key`): moving a single control plane's CA to its replicas.
    pub import: Option<(String, String)>,
    /// The root this replica served before (`DATA_DIR/ca.crt`): nodes trust it.
    pub served: Option<String>,
}

/// The CA from the store; or, when it has none, the one imported, or (once this replica
/// leads, and only on a replica that never served another root) a new one. Waits (saying
/// so) while etcd does not answer or the leader has not made it.
///
/// A store whose root is not the one this replica served before, or not the one it was
/// asked to import, is an error: nodes trust the root they were given, and a second root
/// would split the mesh in two.
pub async fn load(
    store: &Store,
    sealing: &SealingKey,
    known: &Known,
    mut leader: watch::Receiver<bool>,
) -> Result<Ca, StoreCaError> {
    let key = store.layout.ca();
    let import = match &known.import {
        Some((cert_pem, key_pem)) => Some(
            Ca::from_pem(cert_pem, key_pem, "--ca-cert")
                .map_err(|e| StoreCaError::Ca(e, "--ca-cert".into()))?,
        ),
        None => None,
    };
    let mut said = false;
    loop {
        let name = key.as_bytes();
        let (kv, _) =
            super::when_answered(|| async move { Ok(store.client.get(name).await?) }).await?;
        if let Some(kv) = kv {
            let ca = open(&key, &kv.value, sealing)?;
            let differs = |root: &str| root.trim() != ca.root_pem().trim();
            if import
                .as_ref()
                .is_some_and(|i| i.root_der() != ca.root_der())
            {
                return Err(StoreCaError::Conflict(format!(
                    "etcd already holds another root CA than --ca-cert ({key}); leave --ca-cert out to use etcd's"
                )));
            }
            if known.served.as_deref().is_some_and(differs) {
                return Err(StoreCaError::Conflict(format!(
                    "etcd's root CA ({key}) is not the one this replica served before (ca.crt in --data-dir), which nodes trust; if the root really changed, give the nodes the new ca.crt and remove the old one from --data-dir"
                )));
            }
            return Ok(ca);
        }
        let made = match (&known.import, known.served.is_some()) {
            (Some((cert_pem, key_pem)), _) => write(store, &key, sealing, cert_pem, key_pem).await,
            (None, true) => {
                return Err(StoreCaError::Conflict(format!(
                    "etcd holds no CA ({key}), but this replica served a root before (ca.crt in --data-dir): to keep that root, start once with --ca-cert and --ca-key to put it in etcd; to make a new one, remove ca.crt from --data-dir (nodes then need the new one)"
                )))
            }
            (None, false) if *leader.borrow_and_update() => create(store, &key, sealing).await,
            (None, false) => {
                if !said {
                    tracing::info!("no CA in etcd yet: waiting for the leader to make it");
                    said = true;
                }
                tokio::select! {
                    _ = leader.changed() => {}
                    () = tokio::time::sleep(WAIT) => {}
                }
                continue;
            }
        };
        match made {
            Ok(true) => {}
            // Another replica wrote one first: read it next time round.
            Ok(false) => continue,
            Err(StoreCaError::Store(StoreError::Etcd(e))) if e.is_unavailable() => {
                tracing::warn!(error = %e, "cannot write the CA to etcd yet; trying again");
                tokio::time::sleep(WAIT).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes a root and writes it if the store still has none: whether it was written.
async fn create(store: &Store, key: &str, sealing: &SealingKey) -> Result<bool, StoreCaError> {
    let (ca, cert_pem, key_pem) = Ca::generate().map_err(|e| StoreCaError::Ca(e, key.into()))?;
    let written = write(store, key, sealing, &cert_pem, &key_pem).await?;
    if written {
        let expires = ca.root_not_after().map(mesh_daemon::time::rfc3339);
        tracing::info!(
            key,
            expires,
            "made the mesh's root CA and kept it in etcd, its key sealed"
        );
    }
    Ok(written)
}

/// Writes a root and its key (sealed) if the store still has none: whether it was written.
async fn write(
    store: &Store,
    key: &str,
    sealing: &SealingKey,
    cert_pem: &str,
    key_pem: &str,
) -> Result<bool, StoreCaError> {
    let stored = Stored {
        cert_pem: cert_pem.to_owned(),
        key_sealed: seal(key, key_pem, sealing)?,
    };
    let value = serde_json::to_vec(&stored).map_err(|e| StoreCaError::Sealed {
        key: key.into(),
        reason: e.to_string(),
    })?;
    let answer = store
        .client
        .txn(TxnRequest {
            compare: vec![ops::absent(key.as_bytes())],
            success: vec![ops::put(key.as_bytes(), value, 0)],
            failure: vec![],
        })
        .await?;
    Ok(answer.succeeded)
}

fn seal(key: &str, key_pem: &str, sealing: &SealingKey) -> Result<String, StoreCaError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| StoreCaError::Random)?;
    let mut sealed = key_pem.as_bytes().to_vec();
    // The key's name is bound in: a sealed CA moved under another prefix does not open.
    sealing
        .0
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key.as_bytes()),
            &mut sealed,
        )
        .map_err(|_| StoreCaError::Random)?;
    let mut out = nonce.to_vec();
    out.extend(sealed);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

fn open(key: &str, value: &[u8], sealing: &SealingKey) -> Result<Ca, StoreCaError> {
    let bad = |reason: &str| StoreCaError::Sealed {
        key: key.into(),
        reason: reason.into(),
    };
    if value.len() > MAX_VALUE {
        return Err(bad("larger than a CA"));
    }
    let stored: Stored = serde_json::from_slice(value).map_err(|_| bad("not a stored CA"))?;
    let mut sealed = base64::engine::general_purpose::STANDARD
        .decode(stored.key_sealed.as_bytes())
        .map_err(|_| bad("its sealed key is not base64"))?;
    if sealed.len() < NONCE_LEN {
        return Err(bad("its sealed key is cut short"));
    }
    let rest = sealed.split_off(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(&sealed).map_err(|_| bad("bad nonce"))?;
    let mut rest = rest;
    let key_pem = sealing
        .0
        .open_in_place(nonce, Aad::from(key.as_bytes()), &mut rest)
        .map_err(|_| bad("the key does not open it (another --ca-encryption-key?)"))?;
    let key_pem = std::str::from_utf8(key_pem).map_err(|_| bad("its key is not PEM"))?;
    Ca::from_pem(&stored.cert_pem, key_pem, key).map_err(|e| StoreCaError::Ca(e, key.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("mycel-ca-seal-{name}-{}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_sealed_ca_opens_with_its_key_only_and_under_its_name_only() {
        let one = key_file("one", &"11".repeat(32));
        let two = key_file("two", &format!("{}\n", "22".repeat(32)));
        let (k1, k2) = (
            SealingKey::read(&one).unwrap(),
            SealingKey::read(&two).unwrap(),
        );
        let (ca, cert_pem, key_pem) = Ca::generate().unwrap();
        let stored = Stored {
            cert_pem,
            key_sealed: seal("/mycel/ca", &key_pem, &k1).unwrap(),
        };
        let value = serde_json::to_vec(&stored).unwrap();
        assert!(!String::from_utf8_lossy(&value).contains("PRIVATE KEY"));
        let opened = open("/mycel/ca", &value, &k1).unwrap();
        assert_eq!(opened.root_der(), ca.root_der());
        let wrong_key = open("/mycel/ca", &value, &k2).err().unwrap().to_string();
        assert!(wrong_key.contains("does not open"), "{wrong_key}");
        assert!(
            open("/other/ca", &value, &k1).is_err(),
            "bound to its key name"
        );
        for junk in [&b"{}"[..], b"not json", &[0xff; 10]] {
            assert!(open("/mycel/ca", junk, &k1).is_err());
        }
        std::fs::remove_file(one).unwrap();
        std::fs::remove_file(two).unwrap();
    }

    #[test]
    fn a_sealing_key_is_64_hex_digits() {
        for (name, text, says) in [("short", "abcd", "2 bytes"), ("nothex", "zz", "not hex")] {
            let path = key_file(name, text);
            let err = SealingKey::read(&path).err().unwrap().to_string();
            assert!(err.contains(says), "{err}");
            std::fs::remove_file(path).unwrap();
        }
        let missing = SealingKey::read(Path::new("/nonexistent/key"))
            .err()
            .unwrap();
        assert!(missing.to_string().contains("/nonexistent/key"));
    }
}
