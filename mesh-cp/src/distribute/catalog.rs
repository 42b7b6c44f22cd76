//! Every resource of one config version, built once for all nodes.
//!
//! Most of what a node holds is the same for every node (the mesh settings, every workload
//! without its netns, every service with its endpoints, traffic policies and routes): those
//! are built once per version and shared by every stream. What only one node gets, or gets
//! in its own form, is kept apart per node: its own workloads (with their netns), the access
//! policies that select one of them (with those workloads), and their fast-deny sets. The
//! per-node part grows with the pods on a node, not with the mesh.
//!
//! A version is built from the previous one by what changed between their configs, which the
//! config source keeps in shared structure ([`mesh_model::Objects`]): walking the difference
//! skips what the two share, so a change costs mesh-cp in proportion to what it touches, not
//! to the mesh. Building yields the [`Change`]: the keys that changed, shared or per node. A
//! stream then sends a node only those keys ([`super::log`]), so the work per node per change
//! grows with the change too.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use imbl::ordmap::DiffItem;
use mesh_api::{encoded::EncodedResource, keys, v1};
use mesh_model::{
    authz::{DenyTargets, PolicyIndex, Selection},
    in_namespace, Action, Config, ObjectKey, Objects, Service, Workload,
};

/// One resource as every stream sends it, encoded once; shared, never changed once built.
pub type Entry = Arc<EncodedResource>;

/// Entries by key. Persistent, so that a version copies none of the last one's entries.
pub type Part = imbl::OrdMap<String, Entry>;

/// Workloads by key.
type Keys = imbl::OrdSet<ObjectKey>;

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

#[derive(Debug, Clone)]
pub struct Catalog {
    shared: Part,
    nodes: imbl::HashMap<String, Part>,
    /// Each policy's selection at this version: what tells the next version whose parts a
    /// policy change concerns. Persistent sets, so that a workload joining or leaving a
    /// selection of the whole mesh costs a set insert, not a copy.
    selections: imbl::OrdMap<ObjectKey, Keys>,
    pub fast_deny: FastDeny,
    /// Whether some part holds a fast-deny set.
    deny_sets: bool,
    /// The workload that has each address: what a node that takes workloads on demand asks
    /// by. Persistent, like the rest.
    addresses: imbl::HashMap<IpAddr, ObjectKey>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            shared: Part::new(),
            nodes: imbl::HashMap::new(),
            selections: imbl::OrdMap::new(),
            fast_deny: FastDeny::Computed,
            deny_sets: false,
            addresses: imbl::HashMap::new(),
        }
    }
}

/// What one version changed, by key: a key listed is new, changed or removed.
#[derive(Debug, Default)]
pub struct Change {
    pub version: u64,
    /// The version it changed from: the one before, or (versions taken from a store's
    /// revisions, which other writes advance too) an earlier one.
    pub previous: u64,
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
    Arc::new(EncodedResource::new(v1::Resource {
        key,
        kind: Some(kind),
    }))
}

/// Workload `w` as every node sees it, without its netns.
fn shared_workload(w: &Workload, trust_domain: &str) -> Entry {
    let key = keys::workload(&w.key.namespace, &w.key.name);
    let everyone = v1::Workload {
        netns: String::new(),
        identity: w.identity(trust_domain).to_string(),
        ..w.into()
    };
    resource(key, v1::resource::Kind::Workload(everyone))
}

/// Workload `w` as its own node sees it, with its netns.
fn own_workload(w: &Workload, trust_domain: &str) -> Entry {
    let key = keys::workload(&w.key.namespace, &w.key.name);
    let own = v1::Workload {
        netns: w.netns.to_string_lossy().into_owned(),
        identity: w.identity(trust_domain).to_string(),
        ..w.into()
    };
    resource(key, v1::resource::Kind::Workload(own))
}

/// Puts `entry` at its key in `map` unless an equal one is there; records the key if not.
fn put(map: &mut Part, entry: Entry, changed: &mut Vec<String>) {
    match map.get(entry.key()) {
        Some(old) if **old == *entry => {}
        _ => {
            changed.push(entry.key().to_owned());
            map.insert(entry.key().to_owned(), entry);
        }
    }
}

fn remove(map: &mut Part, key: &str, changed: &mut Vec<String>) {
    if map.remove(key).is_some() {
        changed.push(key.to_owned());
    }
}

/// The key and the old and new values of one difference.
fn sides<'a, T>(
    item: DiffItem<'a, 'a, ObjectKey, T>,
) -> (&'a ObjectKey, Option<&'a T>, Option<&'a T>) {
    match item {
        DiffItem::Add(k, v) => (k, None, Some(v)),
        DiffItem::Remove(k, v) => (k, Some(v), None),
        DiffItem::Update { old, new } => (new.0, Some(old.1), Some(new.1)),
    }
}

/// Brings the shared entries of one kind from `old` to `new`: each object that differs is
/// built again (`kind`) under its key (`key` of its namespace and name), each gone removed.
fn mirror<T: PartialEq + Clone>(
    shared: &mut Part,
    old: &Objects<T>,
    new: &Objects<T>,
    key: fn(&str, &str) -> String,
    kind: impl Fn(&T) -> v1::resource::Kind,
    changed: &mut Vec<String>,
) {
    for item in old.diff(new) {
        let (k, _, now) = sides(item);
        let k = key(&k.namespace, &k.name);
        match now {
            Some(object) => put(shared, resource(k, kind(object)), changed),
            None => remove(shared, &k, changed),
        }
    }
}

/// What one node's part must have brought up to date.
#[derive(Debug, Default)]
struct NodePatch {
    /// Workloads placed here before or now: their own entries.
    workloads: BTreeSet<ObjectKey>,
    /// Policies whose entry here (the workloads they select here) may have changed.
    policies: BTreeSet<ObjectKey>,
}

impl Catalog {
    /// Builds `config`'s catalog from `previous` (built from `previous_config`), by what
    /// differs between the two configs. Returns the catalog and what changed, by key.
    pub fn build(
        config: &Config,
        previous: &Catalog,
        previous_config: &Config,
        version: u64,
    ) -> (Catalog, Change) {
        if config.mesh == previous_config.mesh && !previous.shared.is_empty() {
            return Build::new(config, previous, previous_config, version).run();
        }
        // The mesh settings are in every entry (the trust domain in every identity, the root
        // namespace in what mesh-wide policies select): everything again, compared whole.
        let empty = Catalog::default();
        let (fresh, _) = Build::new(config, &empty, &Config::default(), version).run();
        let mut change = Change {
            version,
            ..Change::default()
        };
        change.shared = changed_keys(&previous.shared, &fresh.shared);
        let nodes: HashSet<&String> = previous.nodes.keys().chain(fresh.nodes.keys()).collect();
        let none = Part::new();
        for node in nodes {
            let old = previous.nodes.get(node).unwrap_or(&none);
            let new = fresh.nodes.get(node).unwrap_or(&none);
            let keys = changed_keys(old, new);
            if !keys.is_empty() {
                change.nodes.insert(node.clone(), keys);
            }
        }
        (fresh, change)
    }

    /// `key` as `node` is sent it: its own form if it has one, else the shared one.
    pub fn get(&self, node: &str, key: &str) -> Option<&Entry> {
        self.nodes
            .get(node)
            .and_then(|part| part.get(key))
            .or_else(|| self.shared.get(key))
    }

    /// `key` as every node that has no own form of it is sent it.
    pub fn get_shared(&self, key: &str) -> Option<&Entry> {
        self.shared.get(key)
    }

    /// Whether `key` is in `node`'s own part (one of its workloads, policies, fast-deny sets).
    pub fn is_own(&self, node: &str, key: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|part| part.contains_key(key))
    }

    /// The key of the workload that has `address` (IPv4-mapped IPv6 found as IPv4).
    pub fn workload_at(&self, address: IpAddr) -> Option<String> {
        self.addresses
            .get(&address.to_canonical())
            .map(|k| keys::workload(&k.namespace, &k.name))
    }

    /// What a node that takes other nodes' workloads on demand holds before it watches any:
    /// every shared entry but the workloads, then its own part. Shared workloads are one range
    /// of the map, skipped without a step through it.
    pub fn snapshot_without_workloads<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        let (start, end) = workload_range();
        let before = self.shared.range(..start);
        let after = self.shared.range(end..);
        let own = self
            .nodes
            .get(node)
            .into_iter()
            .flat_map(|part| part.values());
        before.chain(after).map(|(_, e)| e).chain(own)
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

/// The bounds of the workload keys: `workload/` and the string just past every key it starts.
fn workload_range() -> (String, String) {
    let prefix = keys::workload("", "");
    let prefix = prefix[..prefix.len() - 1].to_owned();
    let mut end = prefix.clone();
    // `/` + 1 is `0`: nothing that starts with the prefix sorts at or after this.
    end.pop();
    end.push('0');
    (prefix, end)
}

fn changed_keys(old: &Part, new: &Part) -> Vec<String> {
    old.diff(new)
        .map(|item| match item {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k.clone(),
            DiffItem::Update { new, .. } => new.0.clone(),
        })
        .collect()
}

/// A workload that changed: its key, before and now.
type Changed<'a> = (&'a ObjectKey, Option<&'a Workload>, Option<&'a Workload>);

/// One version being built from the last.
struct Build<'a> {
    config: &'a Config,
    old: &'a Config,
    previous: &'a Catalog,
    shared: Part,
    nodes: imbl::HashMap<String, Part>,
    selections: imbl::OrdMap<ObjectKey, Keys>,
    addresses: imbl::HashMap<IpAddr, ObjectKey>,
    patches: HashMap<&'a str, NodePatch>,
    change: Change,
}

impl<'a> Build<'a> {
    fn new(config: &'a Config, previous: &'a Catalog, old: &'a Config, version: u64) -> Self {
        Self {
            config,
            old,
            previous,
            shared: previous.shared.clone(),
            nodes: previous.nodes.clone(),
            selections: previous.selections.clone(),
            addresses: previous.addresses.clone(),
            patches: HashMap::new(),
            change: Change {
                version,
                ..Change::default()
            },
        }
    }

    fn run(mut self) -> (Catalog, Change) {
        let (config, old) = (self.config, self.old);
        // Only a catalog built afresh lacks the mesh entry: `Catalog::build` builds afresh
        // whenever the mesh settings change.
        if self.shared.is_empty() {
            let mesh = resource(
                keys::MESH.into(),
                v1::resource::Kind::Mesh((&config.mesh).into()),
            );
            put(&mut self.shared, mesh, &mut self.change.shared);
        }
        let workloads: Vec<Changed<'a>> =
            old.workloads.diff(&config.workloads).map(sides).collect();
        let trust_domain = &config.mesh.trust_domain;
        for &(key, before, now) in &workloads {
            match now {
                Some(w) => put(
                    &mut self.shared,
                    shared_workload(w, trust_domain),
                    &mut self.change.shared,
                ),
                None => remove(
                    &mut self.shared,
                    &keys::workload(&key.namespace, &key.name),
                    &mut self.change.shared,
                ),
            }
            for w in before.into_iter().chain(now) {
                self.patch(&w.node).workloads.insert(key.clone());
            }
            // An address passes from one workload to another in one change in either order
            // of their keys: it is given up only where this workload still has it.
            // Canonical, as nodes ask: an IPv4-mapped IPv6 address is found as IPv4.
            for a in before.iter().flat_map(|w| &w.addresses) {
                let a = a.to_canonical();
                if self.addresses.get(&a) == Some(key) {
                    self.addresses.remove(&a);
                }
            }
            for a in now.iter().flat_map(|w| &w.addresses) {
                self.addresses.insert(a.to_canonical(), key.clone());
            }
        }
        self.services(&workloads);
        mirror(
            &mut self.shared,
            &old.traffic_policies,
            &config.traffic_policies,
            keys::traffic_policy,
            |p| v1::resource::Kind::TrafficPolicy(p.into()),
            &mut self.change.shared,
        );
        mirror(
            &mut self.shared,
            &old.routes,
            &config.routes,
            keys::route,
            |r| v1::resource::Kind::Route(r.into()),
            &mut self.change.shared,
        );
        self.policies(&workloads);
        let patched: Vec<&str> = self.patches.keys().copied().collect();
        for node in patched {
            self.apply(node);
        }
        let (fast_deny, deny_sets) = self.fast_deny();
        let catalog = Catalog {
            shared: self.shared,
            nodes: self.nodes,
            selections: self.selections,
            fast_deny,
            deny_sets,
            addresses: self.addresses,
        };
        (catalog, self.change)
    }

    fn patch(&mut self, node: &'a str) -> &mut NodePatch {
        self.patches.entry(node).or_default()
    }

    /// Services that changed (their endpoints found again), and those a changed workload was
    /// or is an endpoint of (their last endpoint list patched): only services of the
    /// workload's namespace can have it as an endpoint.
    fn services(&mut self, workloads: &[Changed<'a>]) {
        let (config, old) = (self.config, self.old);
        let mut again: BTreeSet<&ObjectKey> = BTreeSet::new();
        let mut endpoints_of: BTreeMap<&ObjectKey, Vec<&Changed<'a>>> = BTreeMap::new();
        for item in old.services.diff(&config.services) {
            match sides(item) {
                // Its ports or addresses changed, not what picks its endpoints: the last list
                // stands, patched below for the workloads that changed.
                (_, Some(was), Some(s))
                    if was.selector == s.selector && was.endpoints == s.endpoints =>
                {
                    endpoints_of.entry(&s.key).or_default();
                }
                (_, _, Some(s)) => {
                    again.insert(&s.key);
                }
                (k, _, None) => remove(
                    &mut self.shared,
                    &keys::service(&k.namespace, &k.name),
                    &mut self.change.shared,
                ),
            }
        }
        for changed in workloads {
            for s in in_namespace(&config.services, &changed.0.namespace) {
                if !again.contains(&s.key)
                    && changed.1.into_iter().chain(changed.2).any(|w| s.selects(w))
                {
                    endpoints_of.entry(&s.key).or_default().push(changed);
                }
            }
        }
        for key in again {
            let Some(s) = config.services.get(key) else {
                continue;
            };
            let endpoints = config.endpoints(s).map(|w| w.key.to_string()).collect();
            self.put_service(s, endpoints);
        }
        for (key, changes) in endpoints_of {
            let Some(s) = config.services.get(key) else {
                continue;
            };
            let last = self.shared.get(&keys::service(&key.namespace, &key.name));
            let Some(v1::resource::Kind::Service(last)) =
                last.and_then(|e| e.resource().kind.as_ref())
            else {
                let endpoints = config.endpoints(s).map(|w| w.key.to_string()).collect();
                self.put_service(s, endpoints);
                continue;
            };
            // All of one namespace: `ns/name` sorts as the keys do.
            let mut endpoints = last.endpoints.clone();
            for (k, _, now) in changes {
                let name = k.to_string();
                let at = endpoints.binary_search(&name);
                match (at, now.is_some_and(|w| s.selects(w))) {
                    (Ok(i), false) => {
                        endpoints.remove(i);
                    }
                    (Err(i), true) => endpoints.insert(i, name),
                    _ => {}
                }
            }
            self.put_service(s, endpoints);
        }
    }

    fn put_service(&mut self, s: &Service, endpoints: Vec<String>) {
        let kind = v1::resource::Kind::Service(v1::Service {
            endpoints,
            ..s.into()
        });
        let key = keys::service(&s.key.namespace, &s.key.name);
        put(
            &mut self.shared,
            resource(key, kind),
            &mut self.change.shared,
        );
    }

    /// Brings the selections up to date and says which nodes' policy entries to rebuild: a
    /// changed policy is selected again, on every node where it selected or selects a
    /// workload; a changed workload joins or leaves the selections of the policies in its
    /// scope (its namespace's and the root namespace's), on its nodes before and now.
    fn policies(&mut self, workloads: &[Changed<'a>]) {
        let (config, old) = (self.config, self.old);
        let root = config.mesh.root_namespace.as_str();
        let node_of =
            |cfg: &'a Config, k: &ObjectKey| cfg.workloads.get(k).map(|w| w.node.as_str());
        // Policies selected afresh: new ones, and those whose selector changed. One whose
        // rules alone changed keeps its set, brought up to date below like any other.
        let mut fresh: BTreeSet<&ObjectKey> = BTreeSet::new();
        let mut edited: Vec<(&ObjectKey, Option<Keys>)> = Vec::new();
        for item in old.policies.diff(&config.policies) {
            let (key, was, now) = sides(item);
            let before = self.previous.selections.get(key).cloned();
            match now {
                Some(p) if before.is_some() && was.is_some_and(|w| w.selector == p.selector) => {}
                Some(p) => {
                    fresh.insert(key);
                    let keys: Keys = config.selected_by(p).map(|w| w.key.clone()).collect();
                    self.selections.insert(key.clone(), keys);
                }
                None => {
                    self.selections.remove(key);
                }
            }
            edited.push((key, before));
        }
        for &(key, before, now) in workloads {
            let own = in_namespace(&config.policies, &key.namespace);
            let mesh_wide = (key.namespace != root).then(|| in_namespace(&config.policies, root));
            for p in own.chain(mesh_wide.into_iter().flatten()) {
                if fresh.contains(&p.key) {
                    continue;
                }
                let is = now.is_some_and(|w| p.selects(w));
                let was = match self.selections.get_mut(&p.key) {
                    Some(selection) if is => selection.insert(key.clone()).is_some(),
                    Some(selection) => selection.remove(key).is_some(),
                    // Every policy of the last config has its set; should one not, it is
                    // selected afresh rather than left wrong.
                    None => {
                        let keys: Keys = config.selected_by(p).map(|w| w.key.clone()).collect();
                        self.selections.insert(p.key.clone(), keys);
                        true
                    }
                };
                if was || is {
                    for w in before.into_iter().chain(now) {
                        self.patch(&w.node).policies.insert(p.key.clone());
                    }
                }
            }
        }
        // An edited policy's entry changes wherever it selected or selects a workload.
        for (key, before) in edited {
            let mut nodes: BTreeSet<&'a str> = BTreeSet::new();
            for k in before.iter().flatten() {
                nodes.extend(node_of(old, k));
            }
            for k in self.selections.get(key).into_iter().flatten() {
                nodes.extend(node_of(config, k));
            }
            for node in nodes {
                self.patch(node).policies.insert(key.clone());
            }
        }
    }

    /// Rebuilds the entries of `node`'s part that its patch names.
    fn apply(&mut self, node: &str) {
        let Some(patch) = self.patches.get(node) else {
            return;
        };
        let config = self.config;
        let mut part = self.nodes.get(node).cloned().unwrap_or_default();
        let mut keys = Vec::new();
        for key in &patch.workloads {
            let entry_key = keys::workload(&key.namespace, &key.name);
            match config.workloads.get(key).filter(|w| w.node == node) {
                Some(w) => put(
                    &mut part,
                    own_workload(w, &config.mesh.trust_domain),
                    &mut keys,
                ),
                None => remove(&mut part, &entry_key, &mut keys),
            }
        }
        // The workloads placed here now: the part's own entries, one range of it.
        let here: Vec<ObjectKey> = match patch.policies.is_empty() {
            true => Vec::new(),
            false => {
                let prefix = keys::workload("", "");
                let prefix = &prefix[..prefix.len() - 1];
                part.range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .filter_map(|(k, _)| keys::parse(k).map(|(_, key)| key))
                    .collect()
            }
        };
        for key in &patch.policies {
            let entry_key = keys::policy(&key.namespace, &key.name);
            let policy = config.policies.get(key).zip(self.selections.get(key));
            let mut selected: Vec<&ObjectKey> = match policy {
                Some((_, keys)) => here.iter().filter(|k| keys.contains(*k)).collect(),
                None => Vec::new(),
            };
            selected.sort();
            match policy.filter(|_| !selected.is_empty()) {
                Some((p, _)) => {
                    let kind = v1::resource::Kind::Policy(v1::AccessPolicy {
                        selected: selected.iter().map(ToString::to_string).collect(),
                        ..p.into()
                    });
                    put(&mut part, resource(entry_key, kind), &mut keys);
                }
                None => remove(&mut part, &entry_key, &mut keys),
            }
        }
        self.store(node, part, keys);
    }

    fn store(&mut self, node: &str, part: Part, keys: Vec<String>) {
        if !keys.is_empty() {
            self.change
                .nodes
                .entry(node.to_owned())
                .or_default()
                .extend(keys);
        }
        if part.is_empty() {
            self.nodes.remove(node);
        } else {
            self.nodes.insert(node.to_owned(), part);
        }
    }

    /// Fast-deny sets depend on every destination's policy: any change may change any node's.
    /// Within the budget they are all computed again; past it, none is sent.
    fn fast_deny(&mut self) -> (FastDeny, bool) {
        let config = self.config;
        let sources = config.workloads.len();
        // What can deny is at most every selected workload (every workload, with a mesh that
        // denies by default): checked before anything is built for it.
        let most = match config.mesh.default_action {
            Action::Deny => sources,
            Action::Allow => self.selections.values().map(|s| s.len()).sum(),
        };
        // Nothing can deny: no set to compute, and no need to look for one.
        let within = most > 0 && most.saturating_mul(sources) <= FAST_DENY_BUDGET;
        let selections: Vec<Selection> = match within {
            true => self
                .selections
                .iter()
                .filter_map(|(k, keys)| {
                    let p = config.policies.get(k)?;
                    Some((p.clone(), keys.iter().cloned().collect()))
                })
                .collect(),
            false => Vec::new(),
        };
        let index = PolicyIndex::new(config.mesh.default_action, selections);
        let targets = within
            .then(|| DenyTargets::within(config, &index, FAST_DENY_BUDGET))
            .flatten()
            .filter(|t| t.len().saturating_mul(sources) <= FAST_DENY_BUDGET);
        let state = match &targets {
            Some(_) => FastDeny::Computed,
            None if most == 0 => FastDeny::Computed,
            None => FastDeny::OverBudget,
        };
        let targets = targets.filter(|t| !t.is_empty());
        let anything = !self.change.is_empty();
        let again =
            (targets.is_some() && anything) || (self.previous.deny_sets && targets.is_none());
        if !again {
            return (state, self.previous.deny_sets);
        }
        let mut sets: HashMap<&str, Vec<Entry>> = HashMap::new();
        if let Some(targets) = &targets {
            for w in config.workloads.values() {
                let entries: Vec<v1::FastDenyEntry> = targets
                    .fast_deny(config, &index, w)
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
                sets.entry(w.node.as_str())
                    .or_default()
                    .push(resource(key, kind));
            }
        }
        let any = !sets.is_empty();
        let mut nodes: BTreeSet<String> = self.nodes.keys().cloned().collect();
        nodes.extend(sets.keys().map(|n| n.to_string()));
        for node in nodes {
            let mut part = self.nodes.get(&node).cloned().unwrap_or_default();
            let mut keys = Vec::new();
            let new = sets.remove(node.as_str()).unwrap_or_default();
            // `fast-deny/`: the kind's keys are one range of the part.
            let prefix = keys::fast_deny("", "");
            let prefix = &prefix[..prefix.len() - 1];
            let gone: Vec<String> = part
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .filter(|k| !new.iter().any(|e| e.key() == k))
                .collect();
            for k in gone {
                remove(&mut part, &k, &mut keys);
            }
            for entry in new {
                put(&mut part, entry, &mut keys);
            }
            self.store(&node, part, keys);
        }
        (state, any)
    }
}
