//! Join tokens kept in etcd (`PREFIX/tokens/ID`, each its record as JSON, the secret only
//! hashed), so that a node authenticates to whichever replica it reaches. `mesh-cp token
//! --etcd-endpoints` writes them; each replica keeps them in memory from a watch, so a
//! check never waits on etcd, and a revocation reaches every replica's next check.

use std::{collections::HashMap, sync::Arc, time::Duration};

use mesh_etcd::{
    ops,
    pb::{KeyValue, TxnRequest},
};
use tokio::sync::watch;

use super::{
    follow::{follow, Seen},
    Store, StoreError,
};
use crate::tokens::{issue, Records, TokenError, TokenRecord};

/// Tokens made in one transaction at most.
pub const MAX_AT_ONCE: usize = 60;

/// The most bytes a token record may take: they are a few hundred.
const MAX_RECORD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreTokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("a new token's id was taken meanwhile; nothing was written, try again")]
    Collision,
    #[error("{0} tokens at once: at most {MAX_AT_ONCE} per `token create` with etcd (one transaction); run it again for the rest")]
    TooMany(usize),
}

impl From<mesh_etcd::Error> for StoreTokenError {
    fn from(e: mesh_etcd::Error) -> Self {
        StoreTokenError::Store(e.into())
    }
}

/// Issues a token for each of `nodes`, valid for `ttl`, all in one transaction; only their
/// hashes are stored.
pub async fn create(
    store: &Store,
    nodes: &[String],
    ttl: Duration,
) -> Result<Vec<(TokenRecord, String)>, StoreTokenError> {
    // A comparison and a put per token, within etcd's default --max-txn-ops (128).
    if nodes.len() > MAX_AT_ONCE {
        return Err(StoreTokenError::TooMany(nodes.len()));
    }
    let made = issue(nodes, ttl)?;
    let mut compare = Vec::with_capacity(made.len());
    let mut success = Vec::with_capacity(made.len());
    for (record, _) in &made {
        let key = format!("{}{}", store.layout.tokens(), record.id).into_bytes();
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            reason: e.to_string(),
        })?;
        // A new id only: a clash (48 random bits) writes nothing rather than replace.
        compare.push(ops::absent(&key));
        success.push(ops::put(&key, value, 0));
    }
    let answer = store
        .client
        .txn(TxnRequest {
            compare,
            success,
            failure: vec![],
        })
        .await?;
    if !answer.succeeded {
        return Err(StoreTokenError::Collision);
    }
    Ok(made)
}

/// Removes the token `id`; nodes using it are cut off at their next check, on every replica.
pub async fn revoke(store: &Store, id: &str) -> Result<TokenRecord, StoreTokenError> {
    let key = format!("{}{id}", store.layout.tokens());
    let answer = store
        .client
        .txn(TxnRequest {
            compare: vec![],
            success: vec![ops::delete(key.as_bytes(), true)],
            failure: vec![],
        })
        .await?;
    let removed = answer.responses.into_iter().find_map(|r| match r.response {
        Some(mesh_etcd::pb::response_op::Response::ResponseDeleteRange(d)) => {
            d.prev_kvs.into_iter().next()
        }
        _ => None,
    });
    match removed {
        None => Err(TokenError::NotFound(id.into()).into()),
        // Removed, though it was not a token record: say what was there.
        Some(kv) => Ok(record(&kv).unwrap_or_else(|| TokenRecord {
            id: id.into(),
            node: "(not a token record)".into(),
            secret_sha256: String::new(),
            created: 0,
            expires: None,
        })),
    }
}

/// Every token's record, by id.
pub async fn list(store: &Store) -> Result<Vec<TokenRecord>, StoreTokenError> {
    let (records, _) = read(store).await?;
    let mut all: Vec<TokenRecord> = records.values().cloned().collect();
    all.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    Ok(all)
}

/// The records as of now, and the revision read at.
pub async fn read(store: &Store) -> Result<(Records, i64), StoreError> {
    let (kvs, revision) = store
        .client
        .get_prefix(store.layout.tokens().as_bytes(), 0)
        .await?;
    Ok((Arc::new(records_of(&store.layout.tokens(), kvs)), revision))
}

/// Keeps `records` current from revision `revision` on, for as long as the process runs.
/// While etcd does not answer, the records last read stay (the config source reports it).
pub async fn follow_tokens(store: Store, revision: i64, records: watch::Sender<Records>) {
    let prefix = store.layout.tokens();
    let mut away = false;
    follow(&store, &prefix, revision, |seen, _| match seen {
        Seen::Changed(changes) => records.send_modify(|all| {
            let all = Arc::make_mut(all);
            for change in changes {
                let key = String::from_utf8_lossy(&change.key);
                let id = key.strip_prefix(&prefix).unwrap_or(&key).to_owned();
                let kv = change.value.map(|value| KeyValue {
                    key: change.key.clone(),
                    value,
                    ..KeyValue::default()
                });
                match kv.as_ref().and_then(record).filter(|r| r.id == id) {
                    Some(r) => all.insert(id, r),
                    // Removed, or not a record: no longer a token.
                    None => all.remove(&id),
                };
            }
        }),
        Seen::Reloaded(kvs) => {
            records.send_replace(Arc::new(records_of(&prefix, kvs)));
        }
        // Said once per outage: revocations made meanwhile reach this replica only when
        // etcd answers again.
        Seen::Unreachable(e) => {
            if !away {
                tracing::warn!(error = %e, "join tokens not followed while etcd does not answer; those known stay valid here");
                away = true;
            }
        }
        Seen::Reachable => {
            if away {
                tracing::info!("join tokens followed again");
                away = false;
            }
        }
    })
    .await;
}

/// The records among `kvs` whose key names their id; anything else is left out, and said.
fn records_of(prefix: &str, kvs: Vec<KeyValue>) -> HashMap<String, TokenRecord> {
    kvs.iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key);
            let id = key.strip_prefix(prefix)?;
            match record(kv).filter(|r| r.id == id) {
                Some(r) => Some((r.id.clone(), r)),
                None => {
                    tracing::warn!(key = %key, "not a token record; left out");
                    None
                }
            }
        })
        .collect()
}

fn record(kv: &KeyValue) -> Option<TokenRecord> {
    if kv.value.len() > MAX_RECORD {
        return None;
    }
    serde_json::from_slice(&kv.value).ok()
}
