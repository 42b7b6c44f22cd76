//! The config as a replica serves it from etcd: read whole at start, then followed by a
//! watch, each batch of changes checked as a whole set (as the config dir's are) and
//! published at the revision of its last change.
//!
//! While etcd does not answer, the last config stays in force and nodes keep being served;
//! `/readyz` says why it is not ready, `mycel_cp_store_reachable` is 0, and the watch is
//! tried again (1 s, doubling to 10 s) from the revision it had reached, so that nothing
//! written meanwhile is missed. Should etcd have compacted that history, everything is read
//! again.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::SystemTime};

use mesh_model::{Config, ConfigError, Parser};
use tokio::sync::watch;

use mesh_etcd::pb::KeyValue;

use super::{
    follow::{follow, Seen},
    Store, StoreError,
};
use crate::{
    source::Rejected,
    state::{ConfigStatus, Published, Shared, StoreStatus},
};

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
    /// The objects, by key (in the keys' byte order), as the parser takes them.
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
        let store = self.store.clone();
        let endpoints = store.client.endpoints().to_owned();
        shared.set_store(StoreStatus::reachable(&endpoints, self.revision));
        let mut rejected = Rejected::default();
        let mut said_unmarked = false;
        let objects = store.layout.objects();
        let start = self.revision;
        follow(&store, &store.layout.config(), start, |seen, revision| {
            self.revision = revision;
            match seen {
                Seen::Reachable => {
                    if shared.store().is_some_and(|s| !s.reachable) {
                        tracing::info!(revision, "etcd answers again; following it from where it was left");
                    }
                }
                Seen::Unreachable(e) => {
                    // A first failure is said once; `/status` keeps the latest.
                    if shared.store().is_none_or(|s| s.reachable) {
                        tracing::warn!(error = %e, "etcd unreachable: the last config stays in force while it is tried again");
                    }
                    shared.set_store(StoreStatus::unreachable(&endpoints, revision, e));
                    return;
                }
                Seen::Changed(changes) => {
                    let written = store.layout.written();
                    let marked = changes.iter().any(|c| c.key == written.as_bytes());
                    if !marked && !said_unmarked {
                        // A replica that starts later numbers the config by the marker and
                        // what is left: a delete made by hand would not move it.
                        tracing::warn!("objects changed in etcd without mesh-cp apply or delete; make changes with them, so that every replica numbers the config alike");
                        said_unmarked = true;
                    }
                    for change in changes {
                        self.version = self.version.max(revision_of(change.revision));
                        let key = String::from_utf8_lossy(&change.key).into_owned();
                        if key.starts_with(&objects) {
                            self.set(key, change.value);
                        }
                    }
                    self.publish(&publish, &shared, &mut rejected);
                }
                Seen::Reloaded(kvs) => {
                    let read = Read::of(&store, kvs, revision);
                    self.files = read.files;
                    self.undecodable = read.undecodable;
                    self.version = self.version.max(read.version);
                    self.publish(&publish, &shared, &mut rejected);
                }
            }
            shared.set_store(StoreStatus::reachable(&endpoints, revision));
        })
        .await;
    }

    /// One object changed (`None`: deleted).
    fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        // By the key's bytes, the order etcd reads them in (`Path`'s own order compares
        // components, and puts `shop-eu/a` after `shop/b`).
        let at = self
            .files
            .binary_search_by(|(p, _)| p.as_os_str().as_encoded_bytes().cmp(key.as_bytes()));
        let path = PathBuf::from(&key);
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
    /// The config version: the revision of the last change among them.
    version: u64,
}

async fn read_all(store: &Store) -> Result<Read, StoreError> {
    let (kvs, revision) = store
        .client
        .get_prefix(store.layout.config().as_bytes(), 0)
        .await?;
    Ok(Read::of(store, kvs, revision))
}

impl Read {
    /// The keys under the config prefix, as read at `revision`.
    fn of(store: &Store, kvs: Vec<KeyValue>, revision: i64) -> Self {
        let objects = store.layout.objects();
        let mut read = Read {
            files: Vec::with_capacity(kvs.len()),
            undecodable: BTreeSet::new(),
            revision,
            version: 0,
        };
        for kv in kvs {
            // The last change's revision, as a replica that followed the changes calls the
            // config: `config/written` is rewritten by every apply and delete, so a delete
            // counts too. (Not the revision read at: leases, tokens and other meshes move the
            // store's revision, and a replica that numbered one config higher than the others
            // would refuse their nodes as ahead of it.)
            read.version = read.version.max(revision_of(kv.mod_revision));
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
        read
    }
}

/// A store revision as a config version (a revision is never negative).
fn revision_of(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd reads keys in byte order, where `shop-eu/…` comes before `shop/…` (`Path`'s
    /// order says otherwise): a change must find its key in that order, or a delete is
    /// missed and an update adds a second copy.
    #[tokio::test]
    async fn changes_find_their_key_in_the_order_etcd_reads_them() {
        let args = super::super::EtcdArgs {
            etcd_endpoints: vec!["http://127.0.0.1:9".into()],
            etcd_prefix: "/mycel".into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        };
        let key = |ns: &str, name: &str| format!("/mycel/config/objects/AccessPolicy/{ns}/{name}");
        let mut keys = [key("shop-eu", "a"), key("shop", "b"), key("shop", "c")];
        keys.sort_unstable();
        assert_eq!(keys[0], key("shop-eu", "a"), "etcd's order");
        let mut source = Source {
            store: Store::new(&args).unwrap(),
            parser: Parser::default(),
            files: keys
                .iter()
                .map(|k| (PathBuf::from(k), "old".to_owned()))
                .collect(),
            undecodable: BTreeSet::new(),
            revision: 0,
            version: 0,
        };
        source.set(key("shop-eu", "a"), None);
        source.set(key("shop", "b"), Some(b"new".to_vec()));
        let left: Vec<(String, &str)> = source
            .files
            .iter()
            .map(|(p, t)| (p.display().to_string(), t.as_str()))
            .collect();
        assert_eq!(
            left,
            [(key("shop", "b"), "new"), (key("shop", "c"), "old")],
            "deleted, and updated in place"
        );
    }
}
