//! The config as a replica serves it from etcd: read whole at start, then followed by a
//! watch, each batch of changes checked as a whole set (as the config dir's are) and
//! published at the store's revision.
//!
//! While etcd does not answer, the last config stays in force and nodes keep being served;
//! `/readyz` says why it is not ready, `mycel_cp_store_reachable` is 0, and the watch is
//! tried again (1 s, doubling to 10 s) from the revision it had reached, so that nothing
//! written meanwhile is missed. Should etcd have compacted that history, everything is read
//! again.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_model::{Config, ConfigError, Parser};
use tokio::sync::watch;

use super::{Store, StoreError};
use crate::{
    source::Rejected,
    state::{ConfigStatus, Published, Shared, StoreStatus},
};

pub(super) const RETRY_FIRST: Duration = Duration::from_secs(1);
pub(super) const RETRY_MOST: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the config in etcd is invalid (fix it with mesh-cp apply or mesh-cp delete): {0}")]
    Invalid(ConfigError),
}

/// What a replica has read of the store.
pub struct Source {
    store: Store,
    parser: Parser,
    /// The objects, by key (in key order), as the parser takes them.
    files: Vec<(PathBuf, String)>,
    /// Keys whose value is not text: while there is one, no change is accepted.
    undecodable: BTreeSet<String>,
    /// The store's revision read up to.
    revision: i64,
    /// The revision of the last change under the config prefix: the config version.
    version: u64,
}

impl Source {
    /// Reads the config; waits (saying so every few seconds) while etcd does not answer. A
    /// config that does not check is an error: with no last good one to keep, serving an
    /// empty one would unenroll every workload.
    pub async fn initial(store: Store) -> Result<(Config, u64, Self), LoadError> {
        let read = super::when_answered(|| read_all(&store)).await?;
        let mut source = Self {
            store,
            parser: Parser::default(),
            files: read.files,
            undecodable: read.undecodable,
            revision: read.revision,
            // A store never written to has version 0: nodes hold no version 0, so 1.
            version: read.version.max(1),
        };
        let config = source.check().map_err(LoadError::Invalid)?;
        Ok((config, source.version, source))
    }

    /// The objects as one config, or why not.
    fn check(&mut self) -> Result<Config, ConfigError> {
        if let Some(key) = self.undecodable.first() {
            return Err(ConfigError::Invalid {
                file: PathBuf::from(key),
                doc: 1,
                message: "not UTF-8 text (mesh-cp delete it, or apply it again)".into(),
            });
        }
        self.parser.parse(&self.files)
    }

    /// Follows the store for as long as the process runs, publishing each valid change.
    pub async fn follow(mut self, publish: watch::Sender<Published>, shared: Arc<Shared>) {
        let endpoints = self.store.client.endpoints().to_owned();
        shared.set_store(StoreStatus::reachable(&endpoints, self.revision));
        let mut rejected = Rejected::default();
        let mut wait = RETRY_FIRST;
        loop {
            let ended = self.watch(&publish, &shared, &mut rejected).await;
            let compacted = matches!(ended, mesh_etcd::Error::Compacted { .. });
            if !compacted {
                // A first failure is said once; `/status` keeps the latest.
                if shared.store().is_none_or(|s| s.reachable) {
                    tracing::warn!(error = %ended, "etcd unreachable: the last config stays in force while it is tried again");
                }
                shared.set_store(StoreStatus::unreachable(&endpoints, self.revision, &ended));
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MOST);
                continue;
            }
            tracing::warn!(error = %ended, "reading the whole config again");
            match read_all(&self.store).await {
                Ok(read) => {
                    wait = RETRY_FIRST;
                    self.files = read.files;
                    self.undecodable = read.undecodable;
                    self.revision = read.revision;
                    self.version = self.version.max(read.version);
                    self.publish(&publish, &shared, &mut rejected);
                }
                Err(e) => {
                    shared.set_store(StoreStatus::unreachable(&endpoints, self.revision, &e));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Watches from the revision after the last one read until the watch ends; why it ended.
    async fn watch(
        &mut self,
        publish: &watch::Sender<Published>,
        shared: &Shared,
        rejected: &mut Rejected,
    ) -> mesh_etcd::Error {
        let prefix = self.store.layout.config();
        let mut watch = match self
            .store
            .client
            .watch_prefix(prefix.as_bytes(), self.revision + 1)
            .await
        {
            Ok(w) => w,
            Err(e) => return e,
        };
        if shared.store().is_some_and(|s| !s.reachable) {
            tracing::info!(
                revision = self.revision,
                "etcd answers again; following it from where it was left"
            );
        }
        shared.set_store(StoreStatus::reachable(
            self.store.client.endpoints(),
            self.revision,
        ));
        loop {
            let batch = match watch.next().await {
                Ok(b) => b,
                Err(e) => return e,
            };
            self.revision = self.revision.max(batch.revision);
            if batch.changes.is_empty() {
                continue;
            }
            let objects = self.store.layout.objects();
            for change in batch.changes {
                self.version = self
                    .version
                    .max(u64::try_from(change.revision).unwrap_or(0));
                let key = String::from_utf8_lossy(&change.key).into_owned();
                if key.starts_with(&objects) {
                    self.set(key, change.value);
                }
            }
            self.publish(publish, shared, rejected);
            shared.set_store(StoreStatus::reachable(
                self.store.client.endpoints(),
                self.revision,
            ));
        }
    }

    /// One object changed (`None`: deleted).
    fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        let path = PathBuf::from(&key);
        let at = self.files.binary_search_by(|(p, _)| p.cmp(&path));
        self.undecodable.remove(&key);
        let text = match value.map(String::from_utf8) {
            Some(Ok(text)) => Some(text),
            Some(Err(_)) => {
                self.undecodable.insert(key);
                None
            }
            None => None,
        };
        match (at, text) {
            (Ok(i), Some(text)) => self.files[i].1 = text,
            (Err(i), Some(text)) => self.files.insert(i, (path, text)),
            (Ok(i), None) => {
                self.files.remove(i);
            }
            (Err(_), None) => {}
        }
    }

    /// Publishes the objects as they are now at the version reached, if they check.
    /// Published even when the config is equal to the last (an object rewritten alike), so
    /// that every replica calls the same config by the same version.
    fn publish(
        &mut self,
        publish: &watch::Sender<Published>,
        shared: &Shared,
        rejected: &mut Rejected,
    ) {
        let current = publish.borrow().version;
        match self.check() {
            Ok(config) => {
                rejected.cleared();
                if self.version > current {
                    tracing::info!(
                        version = self.version,
                        workloads = config.workloads.len(),
                        services = config.services.len(),
                        policies = config.policies.len(),
                        "config applied"
                    );
                    // Built outside the channel's lock, as `publish_if_changed` does.
                    let next = publish.borrow().clone().at(self.version, config);
                    publish.send_replace(next);
                }
                shared.set_config_status(ConfigStatus::ok(self.version.max(current)));
            }
            Err(e) => rejected.report(&e, current, shared),
        }
    }
}

/// The objects under the config prefix as of one revision.
struct Read {
    files: Vec<(PathBuf, String)>,
    undecodable: BTreeSet<String>,
    revision: i64,
    /// The revision of the last change among them.
    version: u64,
}

async fn read_all(store: &Store) -> Result<Read, StoreError> {
    let layout = &store.layout;
    let (kvs, revision) = store
        .client
        .get_prefix(layout.config().as_bytes(), 0)
        .await?;
    let objects = layout.objects();
    let mut read = Read {
        files: Vec::with_capacity(kvs.len()),
        undecodable: BTreeSet::new(),
        revision,
        version: 0,
    };
    for kv in kvs {
        read.version = read
            .version
            .max(u64::try_from(kv.mod_revision).unwrap_or(0));
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        if !key.starts_with(&objects) {
            continue;
        }
        match String::from_utf8(kv.value) {
            Ok(text) => read.files.push((PathBuf::from(key), text)),
            Err(_) => {
                read.undecodable.insert(key);
            }
        }
    }
    Ok(read)
}

/// `/status`'s account of the store, as of now.
impl StoreStatus {
    fn reachable(endpoints: &str, revision: i64) -> Self {
        Self {
            endpoints: endpoints.to_owned(),
            reachable: true,
            error: None,
            revision,
            checked_at: SystemTime::now(),
            since: SystemTime::now(),
        }
    }

    fn unreachable(endpoints: &str, revision: i64, error: &dyn std::fmt::Display) -> Self {
        Self {
            endpoints: endpoints.to_owned(),
            reachable: false,
            error: Some(error.to_string()),
            revision,
            checked_at: SystemTime::now(),
            since: SystemTime::now(),
        }
    }
}
