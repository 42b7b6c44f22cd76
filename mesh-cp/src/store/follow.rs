//! Keeping up with a prefix of the store for as long as the process runs: a watch from the
//! revision after the last one read, opened again (1 s, doubling to 10 s) whenever it ends,
//! and everything read again when etcd has compacted the history it would resume from.

use std::time::Duration;

use mesh_etcd::{pb::KeyValue, Change};

use super::Store;

pub(super) const RETRY_FIRST: Duration = Duration::from_secs(1);
pub(super) const RETRY_MOST: Duration = Duration::from_secs(10);

/// What the follower saw.
pub(crate) enum Seen<'a> {
    /// The watch is open, from the revision read up to.
    Reachable,
    /// Changes of whole revisions, in order.
    Changed(Vec<Change>),
    /// Every key, read again as of the revision now reached.
    Reloaded(Vec<KeyValue>),
    /// etcd did not answer, or ended the watch: tried again after a pause.
    Unreachable(&'a mesh_etcd::Error),
}

/// Follows `prefix` from `revision` (the revision already read) on, calling `on` with each
/// thing seen and the revision reached.
pub(crate) async fn follow(
    store: &Store,
    prefix: &str,
    mut revision: i64,
    mut on: impl FnMut(Seen<'_>, i64),
) {
    let mut wait = RETRY_FIRST;
    loop {
        let ended = match store
            .client
            .watch_prefix(prefix.as_bytes(), revision + 1)
            .await
        {
            Ok(mut watch) => {
                wait = RETRY_FIRST;
                on(Seen::Reachable, revision);
                loop {
                    match watch.next().await {
                        Ok(batch) => {
                            revision = revision.max(batch.revision);
                            if !batch.changes.is_empty() {
                                on(Seen::Changed(batch.changes), revision);
                            }
                        }
                        Err(e) => break e,
                    }
                }
            }
            Err(e) => e,
        };
        // Compacted past where it would resume, or an answer it could not take (too large):
        // read it all again, a page at a time.
        let reread = matches!(ended, mesh_etcd::Error::Compacted { .. }) || !ended.is_unavailable();
        if reread {
            tracing::warn!(prefix, error = %ended, "reading the prefix whole again");
            match store.client.get_prefix(prefix.as_bytes(), 0).await {
                Ok((kvs, at)) => {
                    revision = at;
                    on(Seen::Reloaded(kvs), revision);
                    continue;
                }
                Err(e) => on(Seen::Unreachable(&e), revision),
            }
        } else {
            on(Seen::Unreachable(&ended), revision);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MOST);
    }
}
