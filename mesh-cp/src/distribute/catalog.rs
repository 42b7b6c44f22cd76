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
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use mesh_api::{keys, v1};
use mesh_model::{
    authz::{DenyTargets, PolicyIndex, Selection},
    policy::AccessPolicy,
    Config, ObjectKey, Workload,
};

/// One resource as every stream sends it; shared, never changed once built.
pub type Entry = Arc<v1::Resource>;

/// Most policy evaluations one version may spend on fast-deny sets (every source against
/// every destination that can deny it; about half a second of CPU at this budget, spent again
/// on every change, since any change may change any set). Fast-deny only refuses early what
/// the destination's node refuses anyway; past this, the control plane sends none and says
/// so in its log.
pub const FAST_DENY_BUDGET: usize = 1_000_000;

/// Whether this version's fast-deny sets were computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastDeny {
    Computed,
    /// Sources × destinations that can deny was over [`FAST_DENY_BUDGET`].
    OverBudget,
}

#[derive(Debug)]
pub struct Catalog {
    shared: BTreeMap<String, Entry>,
    nodes: HashMap<String, Arc<Part>>,
    /// Each policy and the workloads it selected when this catalog was built: what tells the
    /// next version whose parts a policy change concerns.
    selections: HashMap<ObjectKey, Arc<Selection>>,
    pub fast_deny: FastDeny,
}

/// What only one node gets, by key.
type Part = BTreeMap<String, Entry>;

impl Default for Catalog {
    fn default() -> Self {
        Self {
            shared: BTreeMap::new(),
            nodes: HashMap::new(),
            selections: HashMap::new(),
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

fn resource(key: String, kind: v1::resource::Kind) -> Entry {
    Arc::new(v1::Resource {
        key,
        kind: Some(kind),
    })
}

/// Workload `w` as every node sees it, and as its own node does (with its netns).
fn workload_entries(w: &Workload, trust_domain: &str) -> (Entry, Entry) {
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
    (
        resource(key.clone(), v1::resource::Kind::Workload(everyone)),
        resource(key, v1::resource::Kind::Workload(own)),
    )
}

/// Puts `entry` at its key in `map` unless an equal one is there; records the key if not.
fn put(map: &mut Part, entry: Entry, changed: &mut Vec<String>) {
    match map.get(&entry.key) {
        Some(old) if **old == *entry => {}
        _ => {
            changed.push(entry.key.clone());
            map.insert(entry.key.clone(), entry);
        }
    }
}

fn remove(map: &mut Part, key: String, changed: &mut Vec<String>) {
    if map.remove(&key).is_some() {
        changed.push(key);
    }
}

/// Calls `changed` for each key whose value differs between `old` and `new`, with the new
/// value (`None`: gone), in key order: one walk over both, since both are sorted.
fn diff_maps<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
    mut changed: impl FnMut(&'a K, Option<&'a V>),
) {
    use std::cmp::Ordering;
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ok, _)), Some((nk, _))) => ok.cmp(nk),
        };
        match order {
            // Only the old map has it.
            Ordering::Less => {
                if let Some((k, _)) = old.next() {
                    changed(k, None);
                }
            }
            Ordering::Greater => {
                if let Some((k, v)) = new.next() {
                    changed(k, Some(v));
                }
            }
            Ordering::Equal => {
                if let (Some((_, ov)), Some((k, nv))) = (old.next(), new.next()) {
                    if ov != nv {
                        changed(k, Some(nv));
                    }
                }
            }
        }
    }
}

/// Brings the shared entries of one kind from `old` to `new`: each object that differs is
/// built again (`kind`) under its key (`key` of its namespace and name), each gone removed.
fn mirror<T: PartialEq>(
    shared: &mut Part,
    old: &BTreeMap<ObjectKey, T>,
    new: &BTreeMap<ObjectKey, T>,
    key: fn(&str, &str) -> String,
    kind: impl Fn(&T) -> v1::resource::Kind,
    changed: &mut Vec<String>,
) {
    diff_maps(old, new, |k, now| {
        let k = key(&k.namespace, &k.name);
        match now {
            Some(object) => put(shared, resource(k, kind(object)), changed),
            None => remove(shared, k, changed),
        }
    });
}

impl Catalog {
    /// Builds `config`'s catalog from `previous` (built from `previous_config`): only what
    /// differs between the two configs is built again, so a change costs mesh-cp in
    /// proportion to what it touches, plus a comparison of the configs. `selections` and
    /// `index` are `config`'s policies, as [`Config::selections`] and [`PolicyIndex`] give
    /// them. Returns the catalog and what changed, by key.
    pub fn build(
        config: &Config,
        selections: &[Selection],
        index: &PolicyIndex,
        previous: &Catalog,
        previous_config: &Config,
        version: u64,
    ) -> (Catalog, Change) {
        let mut change = Change {
            version,
            ..Change::default()
        };
        let mut shared = previous.shared.clone();
        let mesh_same = config.mesh == previous_config.mesh;
        if !mesh_same || shared.is_empty() {
            put(
                &mut shared,
                resource(
                    keys::MESH.into(),
                    v1::resource::Kind::Mesh((&config.mesh).into()),
                ),
                &mut change.shared,
            );
        }
        // Nodes whose part must be built again, and namespaces whose services' endpoints may
        // have changed.
        let mut touched: HashSet<&str> = HashSet::new();
        let mut namespaces: HashSet<&str> = HashSet::new();
        let mut any_workload = false;
        let trust_domain = &config.mesh.trust_domain;
        diff_maps(&previous_config.workloads, &config.workloads, |key, now| {
            any_workload = true;
            namespaces.insert(key.namespace.as_str());
            if let Some(old) = previous_config.workloads.get(key) {
                touched.insert(old.node.as_str());
            }
            match now {
                Some(w) => {
                    touched.insert(w.node.as_str());
                    let (everyone, _) = workload_entries(w, trust_domain);
                    put(&mut shared, everyone, &mut change.shared);
                }
                None => remove(
                    &mut shared,
                    keys::workload(&key.namespace, &key.name),
                    &mut change.shared,
                ),
            }
        });
        if !mesh_same {
            // The trust domain is in every identity.
            for w in config.workloads.values() {
                touched.insert(w.node.as_str());
                let (everyone, _) = workload_entries(w, trust_domain);
                put(&mut shared, everyone, &mut change.shared);
            }
        }
        // Built on first use: most changes rebuild no service.
        let mut grouped = None;
        for s in config.services.values() {
            let same = previous_config.services.get(&s.key) == Some(s);
            // Listed endpoints may name any workload; selected ones are in the namespace.
            let endpoints_same = match &s.endpoints {
                Some(_) => !any_workload,
                None => !namespaces.contains(s.key.namespace.as_str()),
            };
            if same && endpoints_same {
                continue;
            }
            let grouped = grouped.get_or_insert_with(|| config.by_namespace());
            let endpoints = config
                .endpoints_in(grouped, s)
                .into_iter()
                .map(|w| w.key.to_string())
                .collect();
            let kind = v1::resource::Kind::Service(v1::Service {
                endpoints,
                ..s.into()
            });
            let key = keys::service(&s.key.namespace, &s.key.name);
            put(&mut shared, resource(key, kind), &mut change.shared);
        }
        for key in previous_config.services.keys() {
            if !config.services.contains_key(key) {
                let key = keys::service(&key.namespace, &key.name);
                remove(&mut shared, key, &mut change.shared);
            }
        }
        mirror(
            &mut shared,
            &previous_config.traffic_policies,
            &config.traffic_policies,
            keys::traffic_policy,
            |p| v1::resource::Kind::TrafficPolicy(p.into()),
            &mut change.shared,
        );
        mirror(
            &mut shared,
            &previous_config.routes,
            &config.routes,
            keys::route,
            |r| v1::resource::Kind::Route(r.into()),
            &mut change.shared,
        );

        // A policy changed, or selecting other workloads, concerns the nodes of the workloads
        // it selected and selects.
        let mut policies: HashMap<ObjectKey, Arc<Selection>> = HashMap::new();
        let node_of = |cfg: &Config, k: &ObjectKey| cfg.workloads.get(k).map(|w| w.node.clone());
        let mut policy_nodes: HashSet<String> = HashSet::new();
        for selection in selections {
            let key = &selection.0.key;
            let kept = previous
                .selections
                .get(key)
                .filter(|old| ***old == *selection);
            let entry = match kept {
                Some(old) => old.clone(),
                None => {
                    let old = previous.selections.get(key);
                    for k in old.iter().flat_map(|o| &o.1) {
                        policy_nodes.extend(node_of(previous_config, k));
                    }
                    for k in &selection.1 {
                        policy_nodes.extend(node_of(config, k));
                    }
                    Arc::new(selection.clone())
                }
            };
            policies.insert(key.clone(), entry);
        }
        for (key, old) in &previous.selections {
            if !policies.contains_key(key) {
                for k in &old.1 {
                    policy_nodes.extend(node_of(previous_config, k));
                }
            }
        }

        // Fast-deny sets depend on every destination's policy: any change may change any
        // node's. Within the budget they are all computed again.
        let sources = config.workloads.len();
        let targets = DenyTargets::within(config, index, FAST_DENY_BUDGET)
            .filter(|t| t.len().saturating_mul(sources) <= FAST_DENY_BUDGET);
        let fast_deny = match &targets {
            Some(_) => FastDeny::Computed,
            None => FastDeny::OverBudget,
        };
        let deny_changed = fast_deny != previous.fast_deny
            || (fast_deny == FastDeny::Computed
                && (!change.shared.is_empty() || !policy_nodes.is_empty()));

        let mut by_node: HashMap<&str, Vec<&Workload>> = HashMap::new();
        for w in config.workloads.values() {
            by_node.entry(w.node.as_str()).or_default().push(w);
        }
        let mut rebuild: HashSet<&str> = touched;
        rebuild.extend(policy_nodes.iter().map(String::as_str));
        if deny_changed {
            rebuild.extend(by_node.keys());
            rebuild.extend(previous.nodes.keys().map(String::as_str));
        }
        let mut selected_here: HashMap<&str, Vec<(&AccessPolicy, Vec<String>)>> = HashMap::new();
        for (policy, selected) in selections {
            let mut on: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for w in selected.iter().filter_map(|k| config.workloads.get(k)) {
                if rebuild.contains(w.node.as_str()) {
                    on.entry(w.node.as_str())
                        .or_default()
                        .push(w.key.to_string());
                }
            }
            for (node, selected) in on {
                selected_here
                    .entry(node)
                    .or_default()
                    .push((policy, selected));
            }
        }

        let mut nodes = previous.nodes.clone();
        let empty = Part::new();
        for node in rebuild {
            let old = previous.nodes.get(node).map_or(&empty, |p| p.as_ref());
            let mut part = Part::new();
            for w in by_node.get(node).into_iter().flatten() {
                let key = keys::workload(&w.key.namespace, &w.key.name);
                let unchanged = mesh_same && previous_config.workloads.get(&w.key) == Some(*w);
                let entry = match old.get(&key).filter(|_| unchanged) {
                    Some(e) => e.clone(),
                    None => workload_entries(w, trust_domain).1,
                };
                part.insert(key, entry);
            }
            for (policy, selected) in selected_here.remove(node).unwrap_or_default() {
                let key = keys::policy(&policy.key.namespace, &policy.key.name);
                let kind = v1::resource::Kind::Policy(v1::AccessPolicy {
                    selected,
                    ..policy.into()
                });
                part.insert(key.clone(), resource(key, kind));
            }
            if let Some(targets) = targets.as_ref().filter(|t| !t.is_empty()) {
                for w in by_node.get(node).into_iter().flatten() {
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
                    part.insert(key.clone(), resource(key, kind));
                }
            }
            // Entries equal to the old ones stay the old ones (versions share memory); the
            // others, and the old keys gone, are the change.
            let mut keys = Vec::new();
            let kept: Part = part
                .into_iter()
                .map(|(key, entry)| match old.get(&key) {
                    Some(o) if **o == *entry => (key, o.clone()),
                    _ => {
                        keys.push(key.clone());
                        (key, entry)
                    }
                })
                .collect();
            keys.extend(old.keys().filter(|k| !kept.contains_key(*k)).cloned());
            if !keys.is_empty() {
                change.nodes.insert(node.to_owned(), keys);
            }
            if kept.is_empty() {
                nodes.remove(node);
            } else {
                nodes.insert(node.to_owned(), Arc::new(kept));
            }
        }
        let catalog = Catalog {
            shared,
            nodes,
            selections: policies,
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
        let mut own = self
            .nodes
            .get(node)
            .into_iter()
            .flat_map(|part| part.iter())
            .peekable();
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
}
