//! Every resource of one config version, built once for all nodes.
//!
//! Most of what a node holds is the same for every node (the mesh settings, every workload
//! without its netns, every service with its endpoints, traffic policies and routes): those
//! are built once per version and shared by every stream. What only one node gets, or gets
//! in its own form, is kept apart per node: its own workloads (with their netns), the access
//! policies that select one of them (with those workloads), and their fast-deny sets. The
//! per-node part grows with the pods on a node, not with the mesh.
//!
//! Building a version compares it with the previous one, resource by resource, which yields
//! the [`Change`]: the keys that changed, shared or per node. A stream then sends a node only
//! those keys ([`super::log`]), so the work per node per change grows with the change.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use mesh_api::{keys, v1};
use mesh_model::{
    authz::{DenyTargets, PolicyIndex, Selection},
    Config,
};

/// One resource as every stream sends it; shared, never changed once built.
pub type Entry = Arc<v1::Resource>;

/// Most policy evaluations one version may spend on fast-deny sets (every source against
/// every destination that can deny it). Fast-deny only refuses early what the destination's
/// node refuses anyway; past this, the control plane sends none rather than spend seconds of
/// CPU on every change, and says so in its log and on `/debug/config`.
pub const FAST_DENY_BUDGET: usize = 4_000_000;

/// Whether this version's fast-deny sets were computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum FastDeny {
    Computed,
    /// Sources × destinations that can deny was over [`FAST_DENY_BUDGET`].
    OverBudget {
        evaluations: usize,
    },
}

#[derive(Debug)]
pub struct Catalog {
    shared: BTreeMap<String, Entry>,
    nodes: HashMap<String, BTreeMap<String, Entry>>,
    pub fast_deny: FastDeny,
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            shared: BTreeMap::new(),
            nodes: HashMap::new(),
            fast_deny: FastDeny::Computed,
        }
    }
}

/// What one version changed, by key: a key listed is new, changed or removed.
#[derive(Debug, Default)]
pub struct Change {
    pub version: u64,
    pub shared: Vec<String>,
    pub nodes: HashMap<String, Vec<String>>,
}

impl Change {
    /// Keys recorded: what the change log holds on its account.
    pub fn len(&self) -> usize {
        self.shared.len() + self.nodes.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn resource(key: String, kind: v1::resource::Kind) -> v1::Resource {
    v1::Resource {
        key,
        kind: Some(kind),
    }
}

impl Catalog {
    /// Builds `config`'s catalog (`selections` and `index` are its policies, as
    /// [`Config::selections`] and [`PolicyIndex`] give them), reusing `previous`'s entries that
    /// did not change, and what changed since it.
    pub fn build(
        config: &Config,
        selections: &[Selection],
        index: &PolicyIndex,
        previous: &Catalog,
        version: u64,
    ) -> (Catalog, Change) {
        let mut shared: BTreeMap<String, Entry> = BTreeMap::new();
        let mut nodes: HashMap<String, BTreeMap<String, Entry>> = HashMap::new();
        shared.insert(
            keys::MESH.to_owned(),
            Arc::new(resource(
                keys::MESH.into(),
                v1::resource::Kind::Mesh((&config.mesh).into()),
            )),
        );
        let trust_domain = &config.mesh.trust_domain;
        for w in config.workloads.values() {
            let key = keys::workload(&w.key.namespace, &w.key.name);
            let everyone = v1::Workload {
                netns: String::new(),
                identity: w.identity(trust_domain).to_string(),
                ..w.into()
            };
            let own = v1::Workload {
                netns: w.netns.to_string_lossy().into_owned(),
                ..everyone.clone()
            };
            nodes.entry(w.node.clone()).or_default().insert(
                key.clone(),
                Arc::new(resource(key.clone(), v1::resource::Kind::Workload(own))),
            );
            shared.insert(
                key.clone(),
                Arc::new(resource(key, v1::resource::Kind::Workload(everyone))),
            );
        }
        let grouped = config.by_namespace();
        for s in config.services.values() {
            let key = keys::service(&s.key.namespace, &s.key.name);
            let endpoints = config
                .endpoints_in(&grouped, s)
                .into_iter()
                .map(|w| w.key.to_string())
                .collect();
            shared.insert(
                key.clone(),
                Arc::new(resource(
                    key,
                    v1::resource::Kind::Service(v1::Service {
                        endpoints,
                        ..s.into()
                    }),
                )),
            );
        }
        for p in config.traffic_policies.values() {
            let key = keys::traffic_policy(&p.key.namespace, &p.key.name);
            shared.insert(
                key.clone(),
                Arc::new(resource(key, v1::resource::Kind::TrafficPolicy(p.into()))),
            );
        }
        for r in config.routes.values() {
            let key = keys::route(&r.key.namespace, &r.key.name);
            shared.insert(
                key.clone(),
                Arc::new(resource(key, v1::resource::Kind::Route(r.into()))),
            );
        }
        // Access policies go only where they select a workload, with those workloads.
        for (policy, selected) in selections {
            let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for w in selected.iter().filter_map(|k| config.workloads.get(k)) {
                by_node
                    .entry(w.node.as_str())
                    .or_default()
                    .push(w.key.to_string());
            }
            let key = keys::policy(&policy.key.namespace, &policy.key.name);
            for (node, selected) in by_node {
                let kind = v1::resource::Kind::Policy(v1::AccessPolicy {
                    selected,
                    ..policy.into()
                });
                nodes
                    .entry(node.to_owned())
                    .or_default()
                    .insert(key.clone(), Arc::new(resource(key.clone(), kind)));
            }
        }
        let fast_deny = fast_deny_sets(config, index, &mut nodes);

        let mut change = Change {
            version,
            ..Change::default()
        };
        let shared = reuse(&previous.shared, shared, &mut change.shared);
        let empty = BTreeMap::new();
        let mut built: HashMap<String, BTreeMap<String, Entry>> = HashMap::new();
        for (node, part) in nodes {
            let old = previous.nodes.get(&node).unwrap_or(&empty);
            let mut keys = Vec::new();
            let part = reuse(old, part, &mut keys);
            if !keys.is_empty() {
                change.nodes.insert(node.clone(), keys);
            }
            built.insert(node, part);
        }
        // Nodes that had a part and have none now lose all of it.
        for (node, old) in &previous.nodes {
            if !built.contains_key(node) {
                change
                    .nodes
                    .insert(node.clone(), old.keys().cloned().collect());
            }
        }
        let catalog = Catalog {
            shared,
            nodes: built,
            fast_deny,
        };
        (catalog, change)
    }

    /// `key` as `node` is sent it: its own form if it has one, else the shared one.
    pub fn get(&self, node: &str, key: &str) -> Option<&Entry> {
        self.nodes
            .get(node)
            .and_then(|part| part.get(key))
            .or_else(|| self.shared.get(key))
    }

    /// Everything `node` holds at this version, in key order, one at a time (a snapshot at
    /// scale is tens of MB: a stream sends it part by part rather than copy it whole).
    pub fn snapshot<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Entry> + 'a {
        let mut shared = self.shared.iter().peekable();
        let mut own = self.nodes.get(node).into_iter().flatten().peekable();
        std::iter::from_fn(move || match (shared.peek(), own.peek()) {
            (Some((s, _)), Some((o, _))) if s == o => {
                shared.next();
                own.next().map(|(_, e)| e)
            }
            (Some((s, _)), Some((o, _))) if o < s => own.next().map(|(_, e)| e),
            (Some(_), _) => shared.next().map(|(_, e)| e),
            (None, _) => own.next().map(|(_, e)| e),
        })
    }

    /// Resources shared by every node.
    pub fn shared_len(&self) -> usize {
        self.shared.len()
    }
}

/// Computes each workload's fast-deny set into its node's part, unless that would cost more
/// than [`FAST_DENY_BUDGET`] evaluations.
fn fast_deny_sets(
    config: &Config,
    index: &PolicyIndex,
    nodes: &mut HashMap<String, BTreeMap<String, Entry>>,
) -> FastDeny {
    let targets = DenyTargets::new(config, index);
    let evaluations = targets.len().saturating_mul(config.workloads.len());
    if evaluations > FAST_DENY_BUDGET {
        return FastDeny::OverBudget { evaluations };
    }
    if targets.is_empty() {
        return FastDeny::Computed;
    }
    for w in config.workloads.values() {
        let entries: Vec<v1::FastDenyEntry> = targets
            .fast_deny(config, index, w)
            .into_iter()
            .map(v1::FastDenyEntry::from)
            .collect();
        if entries.is_empty() {
            continue;
        }
        let key = keys::fast_deny(&w.key.namespace, &w.key.name);
        let kind = v1::resource::Kind::FastDeny(v1::FastDeny {
            namespace: w.key.namespace.clone(),
            name: w.key.name.clone(),
            entries,
        });
        nodes
            .entry(w.node.clone())
            .or_default()
            .insert(key.clone(), Arc::new(resource(key, kind)));
    }
    FastDeny::Computed
}

/// `new`, each entry the old one where equal (so versions share their memory); the keys
/// that differ go to `changed`.
fn reuse(
    old: &BTreeMap<String, Entry>,
    new: BTreeMap<String, Entry>,
    changed: &mut Vec<String>,
) -> BTreeMap<String, Entry> {
    let out = new
        .into_iter()
        .map(|(key, e)| match old.get(&key) {
            Some(o) if **o == *e => (key, o.clone()),
            _ => {
                changed.push(key.clone());
                (key, e)
            }
        })
        .collect::<BTreeMap<_, _>>();
    changed.extend(old.keys().filter(|k| !out.contains_key(*k)).cloned());
    out
}
