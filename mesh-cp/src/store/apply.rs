//! `mesh-cp apply` and `mesh-cp delete` against etcd: the store's objects with the change
//! made, checked whole as a config dir is, then written in one transaction, or nothing is.
//!
//! The transaction holds only if `PREFIX/config/written` is as it was when the objects were
//! read: two writers at once cannot both build on the same state (the loser reads again and
//! checks again, a few times, then says the store is busy).

use std::{collections::BTreeMap, fmt, path::PathBuf, time::SystemTime};

use mesh_etcd::{ops as etcd, pb::TxnRequest};
use mesh_model::{ConfigError, ObjectKey};

use super::{Object, Store, StoreError};

/// Reads and tries again when another writer got in between, before saying the store is busy.
const ATTEMPTS: usize = 5;

/// What became of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    Deleted,
    /// Asked to delete what the store does not hold.
    Absent,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::Absent => "not found",
        })
    }
}

/// What an apply or delete did: each object's outcome, and the config version it wrote (none
/// when nothing changed).
#[derive(Debug)]
pub struct Report {
    pub objects: Vec<(String, Outcome)>,
    pub version: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("nothing was written: with this change the mesh's config would be invalid: {object}: {message}")]
    Invalid { object: String, message: String },
    #[error("nothing was written: other writers changed the config {ATTEMPTS} times while this change was checked; try again")]
    Busy,
    #[error("nothing was written: etcd refused the transaction: {0} (write fewer objects at once, or raise etcd's --max-txn-ops and --max-request-bytes)")]
    TooLarge(String),
}

impl From<mesh_etcd::Error> for ApplyError {
    fn from(e: mesh_etcd::Error) -> Self {
        match &e {
            mesh_etcd::Error::Failed { message, .. }
                if message.contains("too many operations")
                    || message.contains("request is too large") =>
            {
                ApplyError::TooLarge(message.clone())
            }
            _ => ApplyError::Store(e.into()),
        }
    }
}

/// Writes `objects` (new ones created, existing ones replaced).
pub async fn apply(store: &Store, objects: &[Object]) -> Result<Report, ApplyError> {
    let origins = objects
        .iter()
        .map(|o| {
            let key = store.layout.object(o.kind, o.key.as_ref());
            (key, o.origin.clone())
        })
        .collect();
    write(store, &origins, |current| {
        let mut next = current.clone();
        let mut outcomes = Vec::with_capacity(objects.len());
        for object in objects {
            let key = store.layout.object(object.kind, object.key.as_ref());
            let outcome = match next.insert(key, object.text.clone()) {
                None => Outcome::Created,
                Some(old) if old == object.text => Outcome::Unchanged,
                Some(_) => Outcome::Configured,
            };
            outcomes.push((object.name(), outcome));
        }
        (next, outcomes)
    })
    .await
}

/// Removes the objects `targets` name (kind, and key unless a MeshConfig). One the store does
/// not hold is reported as not found, and is no error.
pub async fn delete(
    store: &Store,
    targets: &[(&'static str, Option<ObjectKey>)],
) -> Result<Report, ApplyError> {
    write(store, &BTreeMap::new(), |current| {
        let mut next = current.clone();
        let outcomes = targets
            .iter()
            .map(|(kind, key)| {
                let name = store.layout.object(kind, key.as_ref());
                let outcome = match next.remove(&name) {
                    Some(_) => Outcome::Deleted,
                    None => Outcome::Absent,
                };
                (store.layout.describe(&name), outcome)
            })
            .collect();
        (next, outcomes)
    })
    .await
}

/// Reads the objects, makes `change` of them, checks the result and writes what differs, if
/// nothing else was written meanwhile. `origins` says where the objects written come from,
/// for errors.
async fn write(
    store: &Store,
    origins: &BTreeMap<String, String>,
    change: impl Fn(&BTreeMap<String, String>) -> (BTreeMap<String, String>, Vec<(String, Outcome)>),
) -> Result<Report, ApplyError> {
    let client = &store.client;
    let written = store.layout.written();
    for _ in 0..ATTEMPTS {
        let (marker, revision) = client.get(written.as_bytes()).await?;
        let marker_revision = marker.map_or(0, |kv| kv.mod_revision);
        let (kvs, _) = client
            .get_prefix(store.layout.objects().as_bytes(), revision)
            .await?;
        let mut current = BTreeMap::new();
        // Values that are not text (written by hand): a change may delete or replace them,
        // and must, to be written.
        let mut undecodable = Vec::new();
        for kv in kvs {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let text = String::from_utf8(kv.value).unwrap_or_else(|e| {
                undecodable.push(key.clone());
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            });
            current.insert(key, text);
        }
        let (next, outcomes) = change(&current);
        if let Some(key) = undecodable
            .into_iter()
            .find(|k| next.get(k).is_some_and(|t| current.get(k) == Some(t)))
        {
            return Err(StoreError::Corrupt {
                reason: format!(
                    "not UTF-8 text: delete it first (mesh-cp delete {})",
                    store.layout.describe(&key)
                ),
                key,
            }
            .into());
        }
        let mut ops = Vec::new();
        for (key, text) in &next {
            if current.get(key) != Some(text) {
                ops.push(etcd::put(key.as_bytes(), text.clone().into_bytes(), 0));
            }
        }
        for key in current.keys().filter(|k| !next.contains_key(*k)) {
            ops.push(etcd::delete(key.as_bytes(), false));
        }
        if ops.is_empty() {
            return Ok(Report {
                objects: outcomes,
                version: None,
            });
        }
        let files: Vec<(PathBuf, String)> = next
            .into_iter()
            .map(|(key, text)| (PathBuf::from(key), text))
            .collect();
        mesh_model::parse(&files).map_err(|e| invalid(store, origins, e))?;
        ops.push(etcd::put(written.as_bytes(), marker_text().into_bytes(), 0));
        let request = TxnRequest {
            compare: vec![etcd::unchanged_since(written.as_bytes(), marker_revision)],
            success: ops,
            failure: vec![],
        };
        let answer = client.txn(request).await?;
        if answer.succeeded {
            let version = answer.header.map_or(0, |h| h.revision);
            return Ok(Report {
                objects: outcomes,
                version: u64::try_from(version).ok(),
            });
        }
        tracing::debug!("another writer changed the config meanwhile; reading it again");
    }
    Err(ApplyError::Busy)
}

/// A check's error, naming the object (and, if this change brings it, where it was read)
/// rather than its key.
fn invalid(store: &Store, origins: &BTreeMap<String, String>, e: ConfigError) -> ApplyError {
    let (file, message) = match e {
        ConfigError::Invalid { file, message, .. } => (file, message),
        ConfigError::Read { path, source } => (path, source.to_string()),
    };
    let key = file.display().to_string();
    let mut object = store.layout.describe(&key);
    if let Some(origin) = origins.get(&key) {
        object = format!("{object} ({origin})");
    }
    ApplyError::Invalid { object, message }
}

/// When and from where the last change was written: for whoever reads the store by hand.
fn marker_text() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{} mesh-cp on {host}\n",
        mesh_daemon::time::rfc3339(SystemTime::now())
    )
}
