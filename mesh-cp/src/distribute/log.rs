//! The recent versions' changes, by key: what a stream at some version must be sent to reach
//! the latest. Each stream keeps only its cursor (the version it last sent); a stream that
//! fell further behind than the log reaches, or a node that comes back from a version the
//! log no longer holds, gets a snapshot instead.
//!
//! Versions need not be consecutive (in etcd mode they are the store's revisions): each
//! change names the version it was made from, and the log holds a chain of them.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
};

use super::catalog::Change;

/// Versions the log keeps at most.
pub const MAX_VERSIONS: usize = 1024;
/// Keys the log keeps at most, over all its versions: a bound on its memory (a key is a few
/// dozen bytes). A change larger than this is not kept at all: every stream behind it takes
/// a snapshot, which is about as large.
pub const MAX_KEYS: usize = 1 << 20;

/// Cheap to clone: each published version carries the log up to itself.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// A chain of changes, oldest first: each made from the version of the one before.
    changes: VecDeque<Arc<Change>>,
    keys: usize,
}

impl ChangeLog {
    /// This log with `change` (the next version) added, and the oldest dropped past the
    /// bounds.
    pub fn with(&self, change: Change) -> Self {
        let mut next = self.clone();
        let chained = next
            .changes
            .back()
            .is_none_or(|last| last.version == change.previous);
        if !chained || change.previous >= change.version || change.len() > MAX_KEYS {
            return Self::default();
        }
        next.keys += change.len();
        next.changes.push_back(Arc::new(change));
        while next.changes.len() > MAX_VERSIONS || next.keys > MAX_KEYS {
            if let Some(old) = next.changes.pop_front() {
                next.keys -= old.len();
            }
        }
        next
    }

    /// The keys `node` must be sent to go from version `since` to `latest`: `None` when
    /// the log does not reach back to `since` (or `since` is not a version of this log).
    /// Shared keys are those `keep` keeps (a node that takes workloads on demand is not sent
    /// every workload); the node's own keys all are.
    pub fn since(
        &self,
        since: u64,
        latest: u64,
        node: &str,
        mut keep: impl FnMut(&str) -> bool,
    ) -> Option<BTreeSet<&str>> {
        if since == latest {
            return Some(BTreeSet::new());
        }
        if since > latest {
            return None;
        }
        // Only from a link of the chain: the first change's start, or a change's version. A
        // version between two links (published by another replica, which read the store in
        // other steps) may hold a change that the next link undid: the change that spans it
        // lists only what differs across the whole span, so it would not undo that.
        let first = self.changes.front()?;
        let linked = self
            .changes
            .binary_search_by_key(&since, |c| c.version)
            .is_ok();
        if since != first.previous && !linked {
            return None;
        }
        let mut shared = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for change in self.changes.iter().filter(|c| c.version > since) {
            shared.extend(change.shared.iter().map(String::as_str));
            if let Some(own) = change.nodes.get(node) {
                keys.extend(own.iter().map(String::as_str));
            }
        }
        // Each key asked once, however many versions changed it.
        keys.extend(shared.into_iter().filter(|k| keep(k)));
        Some(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(version: u64, shared: &[&str], node: &[&str]) -> Change {
        Change {
            version,
            previous: version - 1,
            shared: shared.iter().map(|s| s.to_string()).collect(),
            nodes: [(
                "n1".to_string(),
                node.iter().map(|s| s.to_string()).collect(),
            )]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn a_cursor_gets_the_union_of_what_changed_after_it() {
        let log = ChangeLog::default()
            .with(change(2, &["a"], &["x"]))
            .with(change(3, &["b"], &[]))
            .with(change(4, &["a"], &["y"]));
        let keys = |since, node| {
            log.since(since, 4, node, |_| true)
                .map(|k| k.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(keys(1, "n1"), Some(vec!["a", "b", "x", "y"]));
        assert_eq!(keys(2, "n1"), Some(vec!["a", "b", "y"]));
        assert_eq!(keys(3, "n2"), Some(vec!["a"]));
        assert_eq!(keys(4, "n1"), Some(vec![]));
        // Before the log's reach, or after the latest: no way to say, so a snapshot.
        assert_eq!(keys(0, "n1"), None);
        assert_eq!(log.since(5, 4, "n1", |_| true), None);
        // Shared keys as a filter keeps them; the node's own all.
        let kept = log.since(1, 4, "n1", |k| k != "a").unwrap();
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), ["b", "x", "y"]);
    }

    #[test]
    fn the_log_is_bounded_in_versions_and_keys() {
        let mut log = ChangeLog::default();
        for v in 1..=(MAX_VERSIONS as u64 + 10) {
            log = log.with(change(v, &["k"], &[]));
        }
        assert_eq!(log.changes.len(), MAX_VERSIONS);
        let latest = MAX_VERSIONS as u64 + 10;
        assert!(log.since(5, latest, "n1", |_| true).is_none());
        assert!(log.since(latest - 3, latest, "n1", |_| true).is_some());

        let big: Vec<String> = (0..MAX_KEYS / 2 + 1).map(|i| format!("k{i}")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let log = ChangeLog::default()
            .with(change(1, &big, &[]))
            .with(change(2, &big, &[]));
        assert_eq!(log.changes.len(), 1, "the older one is dropped");
        assert!(log.keys <= MAX_KEYS);
        // A change that does not start where the last one ended starts the log again.
        let log = log.with(change(9, &["a"], &[]));
        assert!(log.since(2, 9, "n1", |_| true).is_none());
    }

    /// Versions that are a store's revisions: far apart, each change from the last.
    #[test]
    fn versions_may_leave_gaps_when_each_change_names_its_previous() {
        let gap = |version, previous, shared: &[&str]| Change {
            previous,
            ..change(version, shared, &[])
        };
        let log = ChangeLog::default()
            .with(gap(10, 4, &["a"]))
            .with(gap(17, 10, &["b"]))
            .with(gap(30, 17, &["c"]));
        let keys = |since| {
            log.since(since, 30, "n1", |_| true)
                .map(|k| k.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(keys(4), Some(vec!["a", "b", "c"]));
        assert_eq!(keys(10), Some(vec!["b", "c"]));
        // A version this replica did not publish, inside a change: what another replica
        // published at 12 may have been undone by 17, and the change 10→17 would not say.
        assert_eq!(keys(12), None);
        assert_eq!(keys(3), None, "before the log's first change was made");
        // A change from elsewhere than the last version breaks the chain.
        let broken = log.with(gap(40, 35, &["d"]));
        assert_eq!(broken.since(30, 40, "n1", |_| true), None);
    }
}
