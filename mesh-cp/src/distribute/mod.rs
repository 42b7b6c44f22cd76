//! What each node is sent, built once per config version and shared by every stream.
//!
//! - [`catalog`]: every resource of a version, shared where all nodes see the same thing and
//!   per node where they do not, and what changed since the previous version.
//! - [`log`]: the recent versions' changes, from which a stream at any recent version is
//!   brought to the latest with only what changed (and a node that reconnects resumes).
//! - [`demand`]: what a node that takes other nodes' workloads on demand watches, and what
//!   it is sent for it.
//!
//! A stream's work per change is then a lookup per changed key; only a snapshot grows with
//! the mesh.

pub mod catalog;
pub mod demand;
pub mod log;

use std::sync::Arc;

pub use catalog::{Catalog, Change, FastDeny};
pub use demand::{Answers, WatchError, Watches};
pub use log::ChangeLog;

/// A version's catalog and the log of the changes that led to it.
#[derive(Debug, Clone, Default)]
pub struct Distribution {
    pub catalog: Arc<Catalog>,
    pub log: ChangeLog,
}

/// Most keys one delta carries. A stream further behind than this takes a snapshot, which
/// waits for its place among the snapshots in progress: a node cannot make the control plane
/// do a snapshot's work outside that cap by naming an old version.
pub const MAX_DELTA_KEYS: usize = 10_000;

/// What a stream at some version is sent to reach the latest.
#[derive(Debug, PartialEq)]
pub enum Delta<'a> {
    /// Nothing changed for this node.
    None,
    /// These keys changed: each is sent as the catalog has it, or as removed.
    Changes(Vec<&'a str>),
    /// The log does not reach back far enough, or the change is too large: start again from
    /// a snapshot.
    Snapshot,
}

impl Distribution {
    /// What `node`, holding version `since`, needs to hold `latest` (this distribution's
    /// version).
    pub fn delta(&self, node: &str, since: u64, latest: u64) -> Delta<'_> {
        self.delta_kept(node, since, latest, |_| true)
    }

    /// [`Distribution::delta`] for a node that takes workloads on demand: of the shared
    /// workloads, only those it watches.
    pub fn delta_watched(
        &self,
        node: &str,
        since: u64,
        latest: u64,
        watches: &mut Watches,
    ) -> Delta<'_> {
        self.delta_kept(node, since, latest, |key| watches.keeps(&self.catalog, key))
    }

    fn delta_kept(
        &self,
        node: &str,
        since: u64,
        latest: u64,
        keep: impl FnMut(&str) -> bool,
    ) -> Delta<'_> {
        match self.log.since(since, latest, node, keep) {
            None => Delta::Snapshot,
            Some(keys) if keys.is_empty() => Delta::None,
            Some(keys) if keys.len() > MAX_DELTA_KEYS => Delta::Snapshot,
            Some(keys) => Delta::Changes(keys.into_iter().collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf};

    use mesh_model::{Config, ObjectKey};

    use mesh_api::v1;

    use super::*;
    use crate::{slice, state::Published};

    const BASE: &str = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: a, labels: {app: a}}\nspec: {node: n1, netns: /run/netns/a, addresses: [10.0.0.1]}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: b, labels: {app: b}}\nspec: {node: n2, netns: /run/netns/b, addresses: [10.0.0.2]}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec: {vips: [10.96.0.1], ports: [{port: 80}], selector: {app: b}}\n";
    const C_ON_N2: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: c, labels: {app: b}}\nspec: {node: n2, netns: /run/netns/c, addresses: [10.0.0.3]}\n";
    const C_ON_N1: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: c, labels: {app: b}}\nspec: {node: n1, netns: /run/netns/c1, addresses: [10.0.0.3]}\n";
    const DENY_B: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: only-b}\nspec: {selector: {matchLabels: {app: b}}, action: Deny, rules: [{ports: [80]}]}\n";
    const ROUTE: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r}\nspec: {service: b, backends: [{service: b, weight: 1}]}\n";

    const TRUST: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {trustDomain: other.example}\n";
    const TP: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: tp}\nspec: {services: [b], loadBalancer: LeastConnections}\n";
    const D_ON_N3: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: d, labels: {app: d}}\nspec: {node: n3, netns: /run/netns/d, addresses: [10.0.0.4]}\n";
    const MESH_WIDE: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: everyone, namespace: mycel-system}\nspec: {action: Deny, rules: [{ports: [443]}]}\n";
    const DENY_A: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: only-b}\nspec: {selector: {matchLabels: {app: a}}, action: Deny, rules: [{ports: [80]}]}\n";

    fn config(docs: &[&str]) -> Config {
        let text = format!("{BASE}{}", docs.concat());
        mesh_model::parse(&[(PathBuf::from("c.yaml"), text)]).unwrap()
    }

    /// [`config`] with b's labels changed: it leaves service b and what selects app=b.
    fn relabelled(docs: &[&str]) -> Config {
        let base = BASE.replace("{name: b, labels: {app: b}}", "{name: b, labels: {app: x}}");
        let text = format!("{base}{}", docs.concat());
        mesh_model::parse(&[(PathBuf::from("c.yaml"), text)]).unwrap()
    }

    fn as_map(resources: impl IntoIterator<Item = v1::Resource>) -> BTreeMap<String, v1::Resource> {
        resources.into_iter().map(|r| (r.key.clone(), r)).collect()
    }

    /// A delta's keys as the stream sends them: resources, and removals.
    fn resolve(d: &Distribution, node: &str, keys: Vec<&str>) -> (Vec<v1::Resource>, Vec<String>) {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for key in keys {
            match d.catalog.get(node, key) {
                Some(e) => upserts.push(e.resource().clone()),
                None => removals.push(key.to_owned()),
            }
        }
        (upserts, removals)
    }

    /// The plain definition of what a node holds, without the trust bundle the stream adds.
    fn reference(c: &Config, node: &str) -> BTreeMap<String, v1::Resource> {
        let index = mesh_model::authz::PolicyIndex::new(c.mesh.default_action, c.selections());
        slice::node_slice(c, &index, &[], node)
            .into_iter()
            .filter(|(k, _)| k != mesh_api::keys::TRUST_BUNDLE)
            .collect()
    }

    /// Each version's snapshot is the plain definition, and the delta from every version to
    /// the last brings a node from that version's snapshot to the last one's.
    fn check_against_reference(steps: &[Config]) {
        let mut published = vec![Published::new(1, steps[0].clone())];
        for c in &steps[1..] {
            let next = published.last().unwrap().next(c.clone());
            published.push(next);
        }
        for node in ["n1", "n2", "n3", "n4"] {
            let held: Vec<_> = published
                .iter()
                .map(|p| {
                    as_map(
                        p.distribution
                            .catalog
                            .snapshot(node)
                            .map(|e| e.resource().clone()),
                    )
                })
                .collect();
            for (i, p) in published.iter().enumerate() {
                assert_eq!(
                    held[i],
                    reference(&p.config, node),
                    "{node} at {}",
                    p.version
                );
            }
            let last = published.last().unwrap();
            for (i, p) in published.iter().enumerate() {
                let mut view = held[i].clone();
                match last.distribution.delta(node, p.version, last.version) {
                    Delta::None => {}
                    Delta::Changes(keys) => {
                        let (upserts, removals) = resolve(&last.distribution, node, keys);
                        // A key added and removed again since is removed without being held:
                        // nodes take that as nothing to do.
                        for k in removals {
                            view.remove(&k);
                        }
                        view.extend(as_map(upserts));
                    }
                    Delta::Snapshot => panic!("the log reaches back to every version here"),
                }
                assert_eq!(view, *held.last().unwrap(), "{node} from {}", p.version);
            }
        }
    }

    /// What a node that takes workloads on demand and watches `watched` holds: the plain
    /// definition less the other nodes' workloads it does not watch.
    fn on_demand_reference(
        c: &Config,
        node: &str,
        watched: &[&str],
    ) -> BTreeMap<String, v1::Resource> {
        reference(c, node)
            .into_iter()
            .filter(|(k, r)| match &r.kind {
                // Its own workloads come with their netns.
                Some(v1::resource::Kind::Workload(w)) => {
                    !w.netns.is_empty() || watched.contains(&k.as_str())
                }
                _ => true,
            })
            .collect()
    }

    /// [`check_against_reference`] for nodes that take workloads on demand, each watching
    /// the same keys at every version (as a node that resumes names them).
    fn check_on_demand(steps: &[Config], watched: &[&str]) {
        let mut published = vec![Published::new(1, steps[0].clone())];
        for c in &steps[1..] {
            let next = published.last().unwrap().next(c.clone());
            published.push(next);
        }
        let watching = || {
            let mut w = Watches::default();
            let ask = v1::ConfigAck {
                watch: watched.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            };
            w.resume(&ask).unwrap();
            w
        };
        for node in ["n1", "n2", "n3", "n4"] {
            let held: Vec<_> = published
                .iter()
                .map(|p| {
                    let w = watching();
                    as_map(
                        w.snapshot(&p.distribution.catalog, node)
                            .map(|e| e.resource().clone()),
                    )
                })
                .collect();
            for (i, p) in published.iter().enumerate() {
                let expected = on_demand_reference(&p.config, node, watched);
                assert_eq!(held[i], expected, "{node} at {}", p.version);
            }
            let last = published.last().unwrap();
            for (i, p) in published.iter().enumerate() {
                let mut view = held[i].clone();
                let mut w = watching();
                let delta = last
                    .distribution
                    .delta_watched(node, p.version, last.version, &mut w);
                match delta {
                    Delta::None => {}
                    Delta::Changes(keys) => {
                        for key in keys {
                            match w.entry(&last.distribution.catalog, node, key) {
                                Some(e) => {
                                    view.insert(key.to_owned(), e.resource().clone());
                                }
                                None => {
                                    view.remove(key);
                                }
                            }
                        }
                    }
                    Delta::Snapshot => panic!("the log reaches back to every version here"),
                }
                assert_eq!(view, *held.last().unwrap(), "{node} from {}", p.version);
            }
        }
    }

    // Namespaces `a` and `a-b` on one node: `workload/a-b/…` sorts before `workload/a/…` as a
    // string, after it as a key.
    const IN_A: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: y, namespace: a, labels: {app: b}}\nspec: {node: n1, netns: /run/netns/ay, addresses: [10.0.1.1]}\n";
    const IN_A_B: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: x, namespace: a-b, labels: {app: b}}\nspec: {node: n1, netns: /run/netns/abx, addresses: [10.0.1.2]}\n";
    const IN_ROOT: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: r, namespace: mycel-system, labels: {app: b}}\nspec: {node: n2, netns: /run/netns/r, addresses: [10.0.1.3]}\n";
    /// DENY_B with other rules: the same selector.
    const DENY_B_81: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: only-b}\nspec: {selector: {matchLabels: {app: b}}, action: Deny, rules: [{ports: [81]}]}\n";
    const SVC_C: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {name: c}\nspec: {vips: [10.96.0.3], ports: [{port: 80}], selector: {app: b}}\n";
    /// SVC_C with other ports: the same selector.
    const SVC_C_81: &str = "---\napiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {name: c}\nspec: {vips: [10.96.0.3], ports: [{port: 81}], selector: {app: b}}\n";

    /// What on-demand nodes watch in the walks: a workload that comes and goes and moves
    /// between nodes (c), one always there (b), one of another namespace (a/y), and a key
    /// nothing has.
    const WATCHED: &[&str] = &[
        "workload/default/b",
        "workload/default/c",
        "workload/a/y",
        "workload/default/nothing",
    ];

    const DOCS: [&str; 15] = [
        C_ON_N2, C_ON_N1, DENY_B, ROUTE, TRUST, TP, D_ON_N3, DENY_A, MESH_WIDE, IN_A, IN_A_B,
        IN_ROOT, DENY_B_81, SVC_C, SVC_C_81,
    ];

    /// Documents that define one object: at most one of each group is in a config.
    const SAME_OBJECT: [&[&str]; 3] = [
        &[C_ON_N1, C_ON_N2],
        &[DENY_A, DENY_B, DENY_B_81],
        &[SVC_C, SVC_C_81],
    ];

    /// `docs` on top of the base (or the relabelled base), each document in its own file, read
    /// by one parser: as the config dir gives them, sharing what did not change.
    fn through(parser: &mut mesh_model::Parser, relabel: bool, docs: &[&str]) -> Config {
        let base = match relabel {
            true => BASE.replace("{name: b, labels: {app: b}}", "{name: b, labels: {app: x}}"),
            false => BASE.to_owned(),
        };
        let mut files = vec![(PathBuf::from("base.yaml"), base)];
        for doc in docs {
            let i = DOCS.iter().position(|d| d == doc).unwrap();
            files.push((PathBuf::from(format!("{i}.yaml")), doc.to_string()));
        }
        parser.parse(&files).unwrap()
    }

    #[test]
    fn snapshots_and_deltas_agree_with_the_plain_definition() {
        let steps: [(bool, &[&str]); 21] = [
            (false, &[]),
            (false, &[C_ON_N2]),
            (false, &[C_ON_N2, DENY_B]),
            (false, &[C_ON_N1, DENY_B]),
            (false, &[C_ON_N1, DENY_B, ROUTE]),
            (false, &[ROUTE]),
            (false, &[ROUTE, TP, DENY_B]),
            (false, &[ROUTE, TP, DENY_B, TRUST]),
            (false, &[TP, DENY_A, TRUST, D_ON_N3]),
            (false, &[TP, DENY_A, D_ON_N3]),
            (true, &[TP, DENY_B, C_ON_N1]),
            (false, &[TP, DENY_B, C_ON_N1, MESH_WIDE]),
            (false, &[D_ON_N3, MESH_WIDE]),
            // b leaves and joins again a policy that does not change.
            (false, &[DENY_B, C_ON_N2]),
            (true, &[DENY_B, C_ON_N2]),
            (false, &[DENY_B, C_ON_N2]),
            // The policy's rules change, not its selector; then a service's ports.
            (false, &[DENY_B_81, C_ON_N2, SVC_C]),
            (false, &[DENY_B_81, C_ON_N1, SVC_C_81]),
            // Namespaces whose keys sort unlike their strings, and the root namespace.
            (false, &[MESH_WIDE, IN_A, IN_A_B, IN_ROOT, DENY_B]),
            (false, &[MESH_WIDE, IN_A_B, IN_ROOT, DENY_B_81]),
            (false, &[]),
        ];
        // Each config parsed afresh: nothing shared, every difference found by comparing.
        let fresh: Vec<Config> = steps
            .iter()
            .map(|(relabel, docs)| match relabel {
                true => relabelled(docs),
                false => config(docs),
            })
            .collect();
        check_against_reference(&fresh);
        check_on_demand(&fresh, WATCHED);
        // As the config dir gives them: what did not change is shared and skipped.
        let mut parser = mesh_model::Parser::default();
        let shared: Vec<Config> = steps
            .iter()
            .map(|(relabel, docs)| through(&mut parser, *relabel, docs))
            .collect();
        assert_eq!(shared, fresh);
        check_against_reference(&shared);
    }

    /// Random walks over the same documents, as the config dir would give them.
    #[test]
    fn random_changes_agree_with_the_plain_definition() {
        let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1du64);
        let mut next = move || rng.u64(..);
        for _ in 0..20 {
            let mut parser = mesh_model::Parser::default();
            let steps: Vec<Config> = (0..12)
                .map(|_| {
                    let mut docs: Vec<&str> = Vec::new();
                    for d in DOCS.iter().copied().filter(|_| next() % 3 == 0) {
                        let group = SAME_OBJECT.iter().find(|g| g.contains(&d));
                        if !group.is_some_and(|g| docs.iter().any(|x| g.contains(x))) {
                            docs.push(d);
                        }
                    }
                    through(&mut parser, next() % 4 == 0, &docs)
                })
                .collect();
            check_against_reference(&steps);
            check_on_demand(&steps, WATCHED);
        }
    }

    /// Services whose endpoints are listed (as Kubernetes gives them): patched as workloads
    /// come and go, a listed workload missing from the config included.
    #[test]
    fn listed_endpoints_agree_with_the_plain_definition() {
        let listing = |c: Config, names: &[&str]| {
            let mut c = c;
            let key = ObjectKey::new("default", "b");
            let mut s = c.services.get(&key).unwrap().clone();
            s.endpoints = Some(names.iter().map(|n| ObjectKey::new("default", n)).collect());
            c.services.insert(key, s);
            c
        };
        let steps = [
            listing(config(&[]), &["b"]),
            listing(config(&[C_ON_N2]), &["b", "c"]),
            listing(config(&[C_ON_N1]), &["b", "c"]),
            listing(config(&[]), &["b", "c"]),
            listing(config(&[C_ON_N2]), &["b", "c"]),
            listing(config(&[C_ON_N2]), &["c"]),
        ];
        check_against_reference(&steps);
    }

    #[test]
    fn a_change_too_large_for_a_delta_is_a_snapshot() {
        let many: String = (0..=MAX_DELTA_KEYS)
            .map(|i| format!("---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: m{i}}}\nspec: {{node: n9, netns: /run/netns/m{i}, addresses: ['172.16.{}.{}']}}\n", i >> 8, i & 0xff))
            .collect();
        let before = Published::new(1, config(&[]));
        let after = before.next(config(&[&many]));
        // A node that names version 1 would otherwise make the control plane copy more
        // than MAX_DELTA_KEYS resources outside the cap on snapshots in progress.
        assert_eq!(after.distribution.delta("n1", 1, 2), Delta::Snapshot);
        let small = after.next(config(&[&many, C_ON_N2]));
        assert!(matches!(
            small.distribution.delta("n1", 2, 3),
            Delta::Changes(k) if k.len() == 2
        ));
    }

    #[test]
    fn one_change_is_sent_as_one_change() {
        let before = Published::new(1, config(&[DENY_B]));
        let after = before.next(config(&[DENY_B, C_ON_N2]));
        let keys = |node| match after.distribution.delta(node, 1, 2) {
            Delta::Changes(keys) => {
                let (upserts, removals) = resolve(&after.distribution, node, keys);
                assert!(removals.is_empty());
                upserts.into_iter().map(|r| r.key).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        // n2 holds c with its netns, the policy that now selects it, and their fast-deny.
        assert_eq!(
            keys("n2"),
            [
                "fast-deny/default/b",
                "fast-deny/default/c",
                "policy/default/only-b",
                "service/default/b",
                "workload/default/c"
            ]
        );
        // a, on n1, may no longer reach c on the denied port either.
        assert_eq!(
            keys("n1"),
            [
                "fast-deny/default/a",
                "service/default/b",
                "workload/default/c"
            ]
        );
        assert_eq!(keys("n3"), ["service/default/b", "workload/default/c"]);
        assert_eq!(after.distribution.delta("n1", 2, 2), Delta::None);
        assert_eq!(after.distribution.delta("n1", 0, 2), Delta::Snapshot);
    }
}
