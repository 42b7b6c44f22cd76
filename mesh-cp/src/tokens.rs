//! Join tokens: how a node outside Kubernetes proves which node it is.
//!
//! A token is `<id>.<secret>`. Only the SHA-256 of the secret is stored (the secret is 256
//! random bits, so a slow hash adds nothing). The store is one JSON file in the data dir,
//! changed by `mesh-cp token ...` under a lock and replaced atomically; the server re-reads it
//! when it changes, so a revocation takes effect on the next check without a restart.

use std::{
    collections::HashMap,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const FILE_NAME: &str = "tokens.json";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no token with id {0}")]
    NotFound(String),
    #[error("{0:?} is not a node name (a DNS label: a-z, 0-9, '-', at most 63)")]
    BadNode(String),
    #[error("the system's random source failed; no token was made")]
    Random,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub node: String,
    /// Hex SHA-256 of the secret part.
    pub secret_sha256: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// When it stops being accepted, seconds since the Unix epoch. Tokens made before
    /// expiry existed have none (`token list` says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

/// What a presented join token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Issued to this node and in force.
    Valid(String),
    /// Issued to this node, but expired at this time (unix seconds).
    Expired { node: String, at: u64 },
    /// Unknown, revoked, or malformed.
    Unknown,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// Read-only view for the server: the data dir's file, re-read when its modification time or
/// size changes; or, with etcd, the records a watch keeps current (`store::tokens`).
pub struct TokenStore {
    backing: Backing,
}

enum Backing {
    File {
        path: PathBuf,
        /// By id: every open stream re-checks its token every few seconds, so a check must
        /// not copy or scan the whole set (thousands of nodes).
        cache: Mutex<Option<(FileStamp, Records)>>,
    },
    Watched(tokio::sync::watch::Receiver<Records>),
}

/// Token records by id.
pub type Records = Arc<HashMap<String, TokenRecord>>;

type FileStamp = (SystemTime, u64, u64);

impl TokenStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            backing: Backing::File {
                path: data_dir.join(FILE_NAME),
                cache: Mutex::new(None),
            },
        }
    }

    /// The records `records` holds, as whoever sends on it keeps them.
    pub fn watched(records: tokio::sync::watch::Receiver<Records>) -> Self {
        Self {
            backing: Backing::Watched(records),
        }
    }

    /// What `token` is: valid for a node, expired, or unknown (revoked, malformed).
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let Some((id, secret)) = token.split_once('.') else {
            return Ok(Verified::Unknown);
        };
        let digest = hex::encode(Sha256::digest(secret.as_bytes()));
        let records = self.records()?;
        let found = records
            .get(id)
            .filter(|r| constant_time_eq(r.secret_sha256.as_bytes(), digest.as_bytes()));
        Ok(match found {
            None => Verified::Unknown,
            Some(r) => match r.expires {
                Some(at) if at <= now_secs() => Verified::Expired {
                    node: r.node.clone(),
                    at,
                },
                _ => Verified::Valid(r.node.clone()),
            },
        })
    }

    fn records(&self) -> Result<Records, TokenError> {
        let (path, cache) = match &self.backing {
            Backing::Watched(records) => return Ok(records.borrow().clone()),
            Backing::File { path, cache } => (path, cache),
        };
        let stamp = match std::fs::metadata(path) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt as _;
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Records::default()),
            Err(source) => {
                return Err(TokenError::Read {
                    path: path.clone(),
                    source,
                })
            }
        };
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached, records)) = cache.as_ref() {
            if *cached == stamp {
                return Ok(records.clone());
            }
        }
        let records: Records = Arc::new(
            read_file(path)?
                .tokens
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect(),
        );
        *cache = Some((stamp, records.clone()));
        Ok(records)
    }
}

fn read_file(path: &Path) -> Result<TokenFile, TokenError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TokenError::Corrupt {
            path: path.into(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(source) => Err(TokenError::Read {
            path: path.into(),
            source,
        }),
    }
}

/// Runs `change` on the token file under an exclusive lock and replaces the file atomically.
fn modify<T>(
    data_dir: &Path,
    change: impl FnOnce(&mut TokenFile) -> Result<T, TokenError>,
) -> Result<T, TokenError> {
    let path = data_dir.join(FILE_NAME);
    let lock_path = data_dir.join(".tokens.lock");
    let werr = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TokenError::Write { path: p, source }
    };
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(werr(&lock_path))?;
    // SAFETY: flock on an fd we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(werr(&lock_path)(std::io::Error::last_os_error()));
    }
    let mut file = read_file(&path)?;
    let out = change(&mut file)?;
    let tmp = data_dir.join(".tokens.json.tmp");
    let json = serde_json::to_vec_pretty(&file).map_err(|e| TokenError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    crate::files::replace(&path, &tmp, &json, 0o600)
        .map_err(|(at, source)| TokenError::Write { path: at, source })?;
    Ok(out)
}

/// Issues a token for `node`, valid for `ttl`, and returns it; only its hash is kept.
pub fn create(
    data_dir: &Path,
    node: &str,
    ttl: std::time::Duration,
) -> Result<(TokenRecord, String), TokenError> {
    let mut made = create_many(data_dir, &[node.to_owned()], ttl)?;
    made.pop().ok_or_else(|| TokenError::NotFound(node.into()))
}

/// Issues a token for each of `nodes` in one change of the file (a fleet joins at once
/// without rewriting the file per node), in their order.
pub fn create_many(
    data_dir: &Path,
    nodes: &[String],
    ttl: std::time::Duration,
) -> Result<Vec<(TokenRecord, String)>, TokenError> {
    let made = issue(nodes, ttl)?;
    let stored: Vec<TokenRecord> = made.iter().map(|(r, _)| r.clone()).collect();
    modify(data_dir, move |f| {
        f.tokens.extend(stored);
        Ok(())
    })?;
    Ok(made)
}

/// A new token for each of `nodes`, valid for `ttl`: the record to keep and the token to
/// show once.
pub fn issue(
    nodes: &[String],
    ttl: std::time::Duration,
) -> Result<Vec<(TokenRecord, String)>, TokenError> {
    if let Some(bad) = nodes.iter().find(|n| !mesh_model::is_dns_label(n)) {
        return Err(TokenError::BadNode(bad.clone()));
    }
    let rng = ring::rand::SystemRandom::new();
    let created = now_secs();
    let mut made = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mut id_bytes = [0u8; 6];
        let mut secret_bytes = [0u8; 32];
        rng.fill(&mut id_bytes)
            .and_then(|()| rng.fill(&mut secret_bytes))
            .map_err(|_| TokenError::Random)?;
        let (id, secret) = (hex::encode(id_bytes), hex::encode(secret_bytes));
        let record = TokenRecord {
            id: id.clone(),
            node: node.clone(),
            secret_sha256: hex::encode(Sha256::digest(secret.as_bytes())),
            created,
            expires: Some(created.saturating_add(ttl.as_secs())),
        };
        made.push((record, format!("{id}.{secret}")));
    }
    Ok(made)
}

/// Removes the token with `id`; connected nodes using it are cut off at their next check.
pub fn revoke(data_dir: &Path, id: &str) -> Result<TokenRecord, TokenError> {
    modify(data_dir, |f| {
        let pos = f
            .tokens
            .iter()
            .position(|t| t.id == id)
            .ok_or_else(|| TokenError::NotFound(id.into()))?;
        Ok(f.tokens.remove(pos))
    })
}

pub fn list(data_dir: &Path) -> Result<Vec<TokenRecord>, TokenError> {
    Ok(read_file(&data_dir.join(FILE_NAME))?.tokens)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

    #[test]
    fn a_fleet_gets_its_tokens_in_one_write_or_none() {
        let d = std::env::temp_dir().join(format!("mesh-cp-tokens-many-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let store = TokenStore::new(&d);
        let nodes: Vec<String> = (0..3).map(|i| format!("node-{i}")).collect();
        let made = create_many(&d, &nodes, DEFAULT_TTL).unwrap();
        for ((record, token), node) in made.iter().zip(&nodes) {
            assert_eq!(&record.node, node);
            assert_eq!(store.verify(token).unwrap(), Verified::Valid(node.clone()));
        }
        let bad = vec!["node-9".to_string(), "Bad_Node".to_string()];
        assert!(matches!(
            create_many(&d, &bad, DEFAULT_TTL),
            Err(TokenError::BadNode(n)) if n == "Bad_Node"
        ));
        assert_eq!(
            list(&d).unwrap().len(),
            3,
            "nothing of the refused set was written"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn create_verify_revoke() {
        let d = std::env::temp_dir().join(format!("mesh-cp-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let store = TokenStore::new(&d);
        let (rec, token) = create(&d, "node-1", DEFAULT_TTL).unwrap();
        assert_eq!(
            store.verify(&token).unwrap(),
            Verified::Valid("node-1".into())
        );
        let text = std::fs::read_to_string(d.join(FILE_NAME)).unwrap();
        let secret = token.split_once('.').unwrap().1;
        assert!(!text.contains(secret), "the secret is stored in clear");

        let (_, other) = create(&d, "node-2", DEFAULT_TTL).unwrap();
        assert_eq!(list(&d).unwrap().len(), 2);
        let forged = format!("{}.{}", rec.id, other.split_once('.').unwrap().1);
        assert_eq!(store.verify(&forged).unwrap(), Verified::Unknown);
        assert_eq!(store.verify("garbage").unwrap(), Verified::Unknown);

        revoke(&d, &rec.id).unwrap();
        assert_eq!(store.verify(&token).unwrap(), Verified::Unknown);
        assert!(matches!(revoke(&d, &rec.id), Err(TokenError::NotFound(_))));
        assert!(matches!(
            create(&d, "Bad_Node", DEFAULT_TTL),
            Err(TokenError::BadNode(_))
        ));

        // Regression (issue 19): join tokens never expired.
        let (expiring, token) = create(&d, "node-3", std::time::Duration::ZERO).unwrap();
        assert_eq!(
            store.verify(&token).unwrap(),
            Verified::Expired {
                node: "node-3".into(),
                at: expiring.expires.unwrap()
            }
        );
        // A record from before expiry existed reads, and never expires.
        let old: TokenRecord =
            serde_json::from_str(r#"{"id":"a","node":"n","secret_sha256":"00","created":1}"#)
                .unwrap();
        assert_eq!(old.expires, None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
