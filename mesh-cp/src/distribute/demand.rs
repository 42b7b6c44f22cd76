//! Other nodes' workloads on demand: what one stream's node watches, and what it is sent for
//! it.
//!
//! A node that opens its stream on demand (`x-mycel-on-demand: workloads`) is sent every
//! shared entry but the workloads, and its own part: at 100,000 workloads that is a tenth of
//! the bytes. It names the other workloads it needs by key (a Service's endpoints) or by
//! address (a destination it does not know, a source that reached it), and from then on gets
//! each of them and every change to it. An address that no workload has is answered as
//! absent, and watched: a workload that takes it later is sent.
//!
//! One [`Watches`] per stream, owned by the stream's task. What a node may make the control
//! plane keep is bounded: at most [`MAX_WATCHES`] keys and addresses asked for (each key at
//! most 136 bytes), and a workload found through each watched address; a node that asks for
//! more loses its stream with the reason. Addresses are kept and answered canonical (an
//! IPv4-mapped IPv6 address as IPv4).

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use mesh_api::{keys, v1};

use super::catalog::{Catalog, Entry};

pub use mesh_api::MAX_WATCHES;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("watches on a config stream not opened on demand (`x-mycel-on-demand: workloads`)")]
    NotOnDemand,
    #[error("watch {0:?} is not a workload key (`workload/<namespace>/<name>`, DNS labels)")]
    NotAWorkload(String),
    #[error("watch of an address of {0} bytes (4 or 16)")]
    BadAddress(usize),
    #[error("more than {MAX_WATCHES} workloads and addresses watched on one stream")]
    TooMany,
}

/// What one on-demand stream's node watches, and what it asked for that has not been sent.
#[derive(Debug, Default)]
pub struct Watches {
    keys: HashSet<String>,
    addresses: HashSet<IpAddr>,
    /// Asked for since the last message: sent (or answered absent) in the next one.
    pending_keys: BTreeSet<String>,
    pending_addresses: BTreeSet<IpAddr>,
}

/// What a stream sends for the watches it was asked since its last message.
#[derive(Debug, Default, PartialEq)]
pub struct Answers {
    /// Workload keys: each is sent as the catalog has it for the node, or as removed.
    pub keys: BTreeSet<String>,
    /// Addresses no workload has.
    pub absent: Vec<IpAddr>,
}

impl Watches {
    /// Takes what `message` releases, then what it asks to watch. Checked whole before any of
    /// it is taken: a message with one bad entry changes nothing. A message that adds no more
    /// than it releases is never refused, so a node can always make room (keys found through
    /// watched addresses count, and may take a stream past the bound).
    pub fn request(&mut self, message: &v1::ConfigAck) -> Result<(), WatchError> {
        let keys: HashSet<&String> = workload_keys(&message.watch)?.into_iter().collect();
        let addresses: HashSet<IpAddr> = parse_addresses(&message.watch_addresses)?
            .into_iter()
            .collect();
        let dropped_keys: HashSet<&String> = workload_keys(&message.unwatch)?.into_iter().collect();
        let dropped_addresses: HashSet<IpAddr> = parse_addresses(&message.unwatch_addresses)?
            .into_iter()
            .collect();
        // Counted by walking the message, not the watches: a small message costs little
        // whatever the stream watches.
        let released = dropped_keys
            .iter()
            .filter(|k| self.keys.contains(**k))
            .count()
            + dropped_addresses
                .iter()
                .filter(|a| self.addresses.contains(a))
                .count();
        let added = keys
            .iter()
            .filter(|k| dropped_keys.contains(*k) || !self.keys.contains(**k))
            .count()
            + addresses
                .iter()
                .filter(|a| dropped_addresses.contains(a) || !self.addresses.contains(a))
                .count();
        if added > released && self.len() - released + added > MAX_WATCHES {
            return Err(WatchError::TooMany);
        }
        for key in dropped_keys {
            self.keys.remove(key);
            self.pending_keys.remove(key);
        }
        for ip in &dropped_addresses {
            self.addresses.remove(ip);
            self.pending_addresses.remove(ip);
        }
        for key in keys {
            self.keys.insert(key.clone());
            self.pending_keys.insert(key.clone());
        }
        for ip in addresses {
            self.addresses.insert(ip);
            self.pending_addresses.insert(ip);
        }
        Ok(())
    }

    /// Takes what a resuming node says it watches: every other node's workload it holds (by
    /// key, whether it asked by key or by address) and every address it watches. It holds
    /// their entries at the version it names already, so nothing is pending.
    pub fn resume(&mut self, message: &v1::ConfigAck) -> Result<(), WatchError> {
        self.request(message)?;
        self.pending_keys.clear();
        self.pending_addresses.clear();
        Ok(())
    }

    /// Workload keys and addresses watched.
    pub fn len(&self) -> usize {
        self.keys.len() + self.addresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether something asked for has not been sent yet.
    pub fn has_pending(&self) -> bool {
        !self.pending_keys.is_empty() || !self.pending_addresses.is_empty()
    }

    /// Whether a changed shared entry goes to this node: anything but a workload, a workload
    /// it watches, or one that has an address it watches (which it watches from then on).
    pub fn keeps(&mut self, catalog: &Catalog, key: &str) -> bool {
        if !is_workload(key) || self.keys.contains(key) {
            return true;
        }
        let has_watched_address = catalog.get_shared(key).is_some_and(|entry| {
            addresses_of(entry).any(|ip| self.addresses.contains(&ip.to_canonical()))
        });
        if has_watched_address {
            self.keys.insert(key.to_owned());
        }
        has_watched_address
    }

    /// `key` as this node is sent it: its own entries, shared entries but workloads, and the
    /// workloads it watches. `None`: sent as removed (a workload that was its own and is not
    /// watched, or one that is gone).
    pub fn entry<'c>(&self, catalog: &'c Catalog, node: &str, key: &str) -> Option<&'c Entry> {
        if is_workload(key) && !self.keys.contains(key) && !catalog.is_own(node, key) {
            return None;
        }
        catalog.get(node, key)
    }

    /// What was asked since the last message, found in `catalog`: the keys to send, and the
    /// addresses no workload has. An address that a workload has makes that workload
    /// watched.
    pub fn answer(&mut self, catalog: &Catalog) -> Answers {
        let asked = std::mem::take(&mut self.pending_addresses);
        self.resolve(catalog, asked)
    }

    /// What a snapshot carries for the watches: the keys asked for, and every watched
    /// address found again. A snapshot replaces all the node holds, so an address answered
    /// absent before is answered again, and one that a workload took while the stream was
    /// behind is found.
    pub fn answer_all(&mut self, catalog: &Catalog) -> Answers {
        self.pending_addresses.clear();
        let every: BTreeSet<IpAddr> = self.addresses.iter().copied().collect();
        self.resolve(catalog, every)
    }

    fn resolve(&mut self, catalog: &Catalog, addresses: BTreeSet<IpAddr>) -> Answers {
        let mut answers = Answers {
            keys: std::mem::take(&mut self.pending_keys),
            absent: Vec::new(),
        };
        for ip in addresses {
            match catalog.workload_at(ip) {
                Some(key) => {
                    self.keys.insert(key.clone());
                    answers.keys.insert(key);
                }
                None => answers.absent.push(ip),
            }
        }
        answers
    }

    /// The workload keys watched that no workload has: a snapshot names them as removed, so
    /// that the node knows them absent.
    pub fn missing<'c>(
        &'c self,
        catalog: &'c Catalog,
        node: &'c str,
    ) -> impl Iterator<Item = &'c str> + 'c {
        self.keys
            .iter()
            .filter(move |k| !catalog.is_own(node, k) && catalog.get_shared(k).is_none())
            .map(String::as_str)
    }

    /// Everything this node holds at `catalog`'s version: every shared entry but the
    /// workloads, its own part, then the other workloads it watches that exist.
    pub fn snapshot<'c>(
        &'c self,
        catalog: &'c Catalog,
        node: &'c str,
    ) -> impl Iterator<Item = &'c Entry> + 'c {
        let watched = self
            .keys
            .iter()
            .filter(move |k| !catalog.is_own(node, k))
            .filter_map(move |k| catalog.get_shared(k));
        catalog.snapshot_without_workloads(node).chain(watched)
    }
}

/// `keys`, each checked to be one a workload can have: its namespace and name DNS labels,
/// so that a key is at most 136 bytes whatever a node sends.
fn workload_keys(keys: &[String]) -> Result<Vec<&String>, WatchError> {
    keys.iter()
        .map(|key| match keys::parse(key) {
            Some((keys::Kind::Workload, k))
                if mesh_model::is_dns_label(&k.namespace) && mesh_model::is_dns_label(&k.name) =>
            {
                Ok(key)
            }
            _ => Err(WatchError::NotAWorkload(truncated(key))),
        })
        .collect()
}

/// `raw`, each 4 or 16 bytes, as addresses (an IPv4-mapped IPv6 address as IPv4).
fn parse_addresses(raw: &[Vec<u8>]) -> Result<Vec<IpAddr>, WatchError> {
    raw.iter()
        .map(|a| {
            mesh_api::ip_from_bytes(a)
                .map(|ip| ip.to_canonical())
                .ok_or(WatchError::BadAddress(a.len()))
        })
        .collect()
}

fn is_workload(key: &str) -> bool {
    key.starts_with("workload/")
}

fn addresses_of(entry: &Entry) -> impl Iterator<Item = IpAddr> + '_ {
    let addresses = match &entry.resource().kind {
        Some(v1::resource::Kind::Workload(w)) => w.addresses.as_slice(),
        _ => &[],
    };
    addresses.iter().filter_map(|a| mesh_api::ip_from_bytes(a))
}

/// A key as an error names it: a node's bytes are not echoed at any length.
fn truncated(key: &str) -> String {
    key.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::Published;

    const CONFIG: &str = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /run/netns/a, addresses: [10.0.0.1]}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: b}\nspec: {node: n2, netns: /run/netns/b, addresses: [10.0.0.2, 'fd00::2']}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: c}\nspec: {node: n2, netns: /run/netns/c, addresses: [10.0.0.3]}\n";

    fn catalog() -> Published {
        let config = mesh_model::parse(&[(PathBuf::from("c.yaml"), CONFIG.into())]).unwrap();
        Published::new(1, config)
    }

    fn ask(keys: &[&str], addresses: &[&[u8]]) -> v1::ConfigAck {
        v1::ConfigAck {
            watch: keys.iter().map(|k| k.to_string()).collect(),
            watch_addresses: addresses.iter().map(|a| a.to_vec()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn asked_keys_and_addresses_are_answered_once() {
        let published = catalog();
        let catalog = &published.distribution.catalog;
        let mut w = Watches::default();
        let v6: &[u8] = &"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        w.request(&ask(
            &["workload/default/c", "workload/default/gone"],
            &[&[10, 0, 0, 2], v6, &[10, 9, 9, 9]],
        ))
        .unwrap();
        assert!(w.has_pending());
        let answers = w.answer(catalog);
        // b twice (by both its addresses) is sent once; c and the key no workload has are
        // sent as the catalog has them (a removal, for the latter).
        assert_eq!(
            answers.keys.iter().map(String::as_str).collect::<Vec<_>>(),
            [
                "workload/default/b",
                "workload/default/c",
                "workload/default/gone"
            ]
        );
        assert_eq!(answers.absent, [IpAddr::from([10, 9, 9, 9])]);
        assert!(!w.has_pending());
        assert_eq!(w.answer(catalog), Answers::default());
        // Watched: b (found by address), c and the missing key; and the three addresses.
        assert_eq!(w.len(), 6);
        assert!(w.entry(catalog, "n1", "workload/default/b").is_some());
        assert!(w.entry(catalog, "n1", "workload/default/gone").is_none());
        // A snapshot names the watched key no workload has, as removed.
        assert_eq!(
            w.missing(catalog, "n1").collect::<Vec<_>>(),
            ["workload/default/gone"]
        );
    }

    #[test]
    fn a_node_is_sent_its_own_and_watched_workloads_only() {
        let published = catalog();
        let catalog = &published.distribution.catalog;
        let mut w = Watches::default();
        // Its own workload, in its own form (with the netns).
        let own = w.entry(catalog, "n1", "workload/default/a").unwrap();
        assert!(
            matches!(&own.resource().kind, Some(v1::resource::Kind::Workload(x)) if x.netns == "/run/netns/a")
        );
        assert!(w.entry(catalog, "n1", "workload/default/b").is_none());
        assert!(w.entry(catalog, "n1", "mesh").is_some());
        // A changed shared workload goes only where it is watched, by key or by address.
        assert!(w.keeps(catalog, "mesh"));
        assert!(!w.keeps(catalog, "workload/default/b"));
        w.request(&ask(&[], &[&[10, 0, 0, 3]])).unwrap();
        w.answer(catalog);
        assert!(w.keeps(catalog, "workload/default/c"));
        w.request(&ask(&[], &[&[10, 0, 0, 2]])).unwrap();
        // Found through its address in a change before the answer: watched from then on.
        assert!(w.keeps(catalog, "workload/default/b"));
        assert!(w.entry(catalog, "n1", "workload/default/b").is_some());
        let shown: Vec<&str> = catalog
            .snapshot_without_workloads("n1")
            .map(|e| e.key())
            .collect();
        assert_eq!(shown, ["mesh", "workload/default/a"]);
    }

    #[test]
    fn a_snapshot_answers_every_watched_address_again() {
        let published = catalog();
        let catalog = &published.distribution.catalog;
        let mut w = Watches::default();
        w.request(&ask(&[], &[&[10, 9, 9, 9], &[10, 0, 0, 3]]))
            .unwrap();
        w.answer(catalog);
        let again = w.answer_all(catalog);
        assert_eq!(again.absent, [IpAddr::from([10, 9, 9, 9])]);
        assert_eq!(
            again.keys.iter().map(String::as_str).collect::<Vec<_>>(),
            ["workload/default/c"]
        );
        // An IPv4-mapped IPv6 address is the IPv4 one.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            catalog.workload_at(mapped).as_deref(),
            Some("workload/default/a")
        );
    }

    #[test]
    fn bad_or_too_many_watches_are_refused_whole() {
        let mut w = Watches::default();
        assert_eq!(
            w.request(&ask(&["workload/default/a", "service/default/s"], &[])),
            Err(WatchError::NotAWorkload("service/default/s".into()))
        );
        assert_eq!(
            w.request(&ask(&["workload/default/a"], &[&[1, 2, 3]])),
            Err(WatchError::BadAddress(3))
        );
        let long = format!("x{}", "y".repeat(10_000));
        match w.request(&ask(&[&long], &[])) {
            Err(WatchError::NotAWorkload(k)) => assert_eq!(k.len(), 128),
            other => panic!("{other:?}"),
        }
        // A key no workload could have: names are DNS labels, so a key is short.
        let huge = format!("workload/default/{}", "a".repeat(4 << 20));
        for key in ["workload/default/UPPER", "workload/-x/a", huge.as_str()] {
            assert!(
                matches!(
                    w.request(&ask(&[key], &[])),
                    Err(WatchError::NotAWorkload(_))
                ),
                "{}",
                &key[..40.min(key.len())]
            );
        }
        assert!(w.is_empty(), "a refused message takes nothing");
        let many: Vec<String> = (0..MAX_WATCHES)
            .map(|i| format!("workload/default/w{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        w.request(&ask(&many, &[])).unwrap();
        // Asking again for what is watched costs nothing; one more is too many.
        w.request(&ask(&many[..10], &[])).unwrap();
        assert_eq!(
            w.request(&ask(&[], &[&[10, 0, 0, 1]])),
            Err(WatchError::TooMany)
        );
        assert_eq!(w.len(), MAX_WATCHES);
    }

    #[test]
    fn what_a_node_releases_is_no_longer_sent_nor_counted() {
        let published = catalog();
        let catalog = &published.distribution.catalog;
        let mut w = Watches::default();
        w.request(&ask(
            &["workload/default/b"],
            &[&[10, 9, 9, 9], &[10, 0, 0, 3]],
        ))
        .unwrap();
        w.answer(catalog);
        assert_eq!(w.len(), 4, "b, c (by its address) and the two addresses");
        let release = v1::ConfigAck {
            unwatch: vec!["workload/default/b".into()],
            unwatch_addresses: vec![vec![10, 9, 9, 9]],
            ..Default::default()
        };
        w.request(&release).unwrap();
        assert_eq!(w.len(), 2);
        assert!(!w.keeps(catalog, "workload/default/b"));
        assert!(w.entry(catalog, "n1", "workload/default/b").is_none());
        // Released and asked again in one message: watched, and sent again.
        let again = v1::ConfigAck {
            unwatch: vec!["workload/default/c".into()],
            watch: vec!["workload/default/c".into()],
            ..Default::default()
        };
        w.request(&again).unwrap();
        assert_eq!(w.answer(catalog).keys.len(), 1);
        // A full set makes room by releasing in the same message.
        let mut full = Watches::default();
        let many: Vec<String> = (0..MAX_WATCHES)
            .map(|i| format!("workload/default/w{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        full.request(&ask(&many, &[])).unwrap();
        let swap = v1::ConfigAck {
            unwatch: vec!["workload/default/w0".into()],
            watch_addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        full.request(&swap).unwrap();
        assert_eq!(full.len(), MAX_WATCHES);
        // Releasing alone is never refused.
        let release = v1::ConfigAck {
            unwatch: vec!["workload/default/w1".into()],
            ..Default::default()
        };
        full.request(&release).unwrap();
        assert_eq!(full.len(), MAX_WATCHES - 1);
    }

    #[test]
    fn a_resuming_node_names_its_watches_and_is_sent_nothing_for_them() {
        let published = catalog();
        let mut w = Watches::default();
        w.resume(&ask(&["workload/default/b"], &[&[10, 9, 9, 9]]))
            .unwrap();
        assert!(!w.has_pending());
        assert_eq!(
            w.answer(&published.distribution.catalog),
            Answers::default()
        );
        assert!(w.keeps(&published.distribution.catalog, "workload/default/b"));
    }
}
