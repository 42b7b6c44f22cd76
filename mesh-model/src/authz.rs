//! Policy evaluation: is this connection to this workload and port allowed, and what decided it?
//!
//! The rules (DESIGN.md, Policy): a matching enforced Deny rule denies; otherwise, when any
//! enforced Allow policy selects the workload, one of its rules must match; otherwise the mesh's
//! default action applies. DryRun policies never change the verdict; their matching rules are
//! reported so they can be logged and counted.
//!
//! [`PolicyIndex`] answers without looking at policies that cannot apply: rules are filed by
//! destination workload, then by port when the rule names a few ports, so a check reads a handful
//! of rules whatever the size of the mesh. [`linear`] is the same semantics written as a plain
//! scan over every policy; tests check the index against it, and the benchmark uses it as the
//! baseline.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    policy::{AccessPolicy, Matcher, PortRange, Rule},
    Action, Config, Mode, ObjectKey, Service, SpiffeId, Workload,
};

/// The client of a connection, as the destination knows it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub address: IpAddr,
    /// The verified client workload; `None` for plaintext, whose only trusted fact is its
    /// address. Identity, namespace and label clauses never match such a client (their `not…`
    /// forms always do).
    pub workload: Option<SourceWorkload<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct SourceWorkload<'a> {
    /// The SPIFFE ID URI.
    pub identity: &'a str,
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> SourceWorkload<'a> {
    /// `w` as a client whose identity (`identity`, `uri` its text) its node verified.
    pub fn of(w: &'a Workload, identity: &'a SpiffeId, uri: &'a str) -> Self {
        Self {
            identity: uri,
            namespace: &identity.namespace,
            labels: &w.labels,
        }
    }
}

/// A rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleHit {
    pub policy: ObjectKey,
    /// Index into the policy's `spec.rules`.
    pub rule: usize,
    pub action: Action,
    pub mode: Mode,
}

impl fmt::Display for RuleHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {} rule {}", self.policy, self.rule)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum DecidedBy {
    /// An enforced rule: the first matching Deny rule, else the first matching Allow rule
    /// (policies in namespace/name order, rules in order).
    Rule(RuleHit),
    /// Enforced Allow policies select the workload and none of their rules matched.
    NoAllowMatched,
    /// No enforced policy has a say: `MeshConfig.defaultAction`.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub decided_by: DecidedBy,
    /// The first matching rule of each DryRun policy that selects the workload.
    pub dry_run: Vec<RuleHit>,
}

impl Decision {
    /// `namespace/name` of the deciding policy, or `default`.
    pub fn policy_name(&self) -> String {
        match &self.decided_by {
            DecidedBy::Rule(hit) => hit.policy.to_string(),
            DecidedBy::NoAllowMatched | DecidedBy::Default => "default".into(),
        }
    }

    /// The deciding rule's index; `no-allow-match` or `-` when no rule decided.
    pub fn rule_name(&self) -> String {
        match &self.decided_by {
            DecidedBy::Rule(hit) => hit.rule.to_string(),
            DecidedBy::NoAllowMatched => "no-allow-match".into(),
            DecidedBy::Default => "-".into(),
        }
    }

    /// The action of the deciding rule, or the verdict itself for a default decision.
    pub fn action(&self) -> Action {
        match &self.decided_by {
            DecidedBy::Rule(hit) => hit.action,
            _ if self.allowed => Action::Allow,
            _ => Action::Deny,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        match &self.decided_by {
            DecidedBy::Rule(hit) => write!(f, "{verdict} by {hit} ({} {})", hit.mode, hit.action),
            DecidedBy::NoAllowMatched => write!(
                f,
                "{verdict} by default: Allow policies select the destination and none of their rules matched"
            ),
            DecidedBy::Default => write!(f, "{verdict} by default (MeshConfig defaultAction)"),
        }
    }
}

/// Does the rule match a connection from `src` to `port`?
pub fn rule_matches(rule: &Rule, port: u16, src: &Source<'_>) -> bool {
    rule.clauses
        .iter()
        .all(|c| matcher_matches(&c.matcher, port, src) != c.negated)
}

fn matcher_matches(m: &Matcher, port: u16, src: &Source<'_>) -> bool {
    match m {
        Matcher::Identities(patterns) => src
            .workload
            .is_some_and(|w| patterns.iter().any(|p| p.matches(w.identity))),
        Matcher::Namespaces(list) => src
            .workload
            .is_some_and(|w| list.iter().any(|n| n == w.namespace)),
        Matcher::Labels(wanted) => src
            .workload
            .is_some_and(|w| wanted.iter().all(|(k, v)| w.labels.get(k) == Some(v))),
        Matcher::Cidrs(blocks) => blocks.iter().any(|b| b.contains(src.address)),
        Matcher::Ports(ranges) => ranges.iter().any(|r| r.contains(port)),
    }
}

/// A policy with the workloads it selects (resolved by whoever holds the workload list).
pub type Selection = (AccessPolicy, Vec<ObjectKey>);

/// Position of a rule: policy index (in key order) and rule index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RuleRef {
    policy: u32,
    rule: u32,
}

/// Rules filed by the one port set they require, when it is small.
#[derive(Debug, Default)]
struct Buckets {
    by_port: HashMap<u16, Vec<RuleRef>>,
    any_port: Vec<RuleRef>,
}

/// A rule whose required ports are more than this many is filed under every port.
const MAX_BUCKETED_PORTS: u32 = 64;

impl Buckets {
    fn file(&mut self, r: RuleRef, rule: &Rule) {
        match required_ports(rule) {
            Some(ports) => {
                for p in ports {
                    self.by_port.entry(p).or_default().push(r);
                }
            }
            None => self.any_port.push(r),
        }
    }

    fn all(&self) -> impl Iterator<Item = RuleRef> + '_ {
        self.by_port
            .values()
            .flatten()
            .chain(&self.any_port)
            .copied()
    }

    fn candidates(&self, port: u16) -> impl Iterator<Item = RuleRef> + '_ {
        self.by_port
            .get(&port)
            .into_iter()
            .flatten()
            .chain(&self.any_port)
            .copied()
    }
}

/// The ports of the rule's first positive port clause, if there are few: a connection to any
/// other port cannot match the rule.
fn required_ports(rule: &Rule) -> Option<Vec<u16>> {
    rule.clauses.iter().find_map(|c| match &c.matcher {
        Matcher::Ports(ranges) if !c.negated => {
            let total: u32 = ranges
                .iter()
                .map(|r| u32::from(r.last) - u32::from(r.first) + 1)
                .sum();
            (total <= MAX_BUCKETED_PORTS)
                .then(|| ranges.iter().flat_map(|r| r.first..=r.last).collect())
        }
        _ => None,
    })
}

/// Rules that apply to one destination workload.
#[derive(Debug, Default)]
struct Selected {
    /// Enforced Allow policies selecting the workload; if any, a match is required.
    enforced_allows: usize,
    deny: Buckets,
    allow: Buckets,
    dry_run: Buckets,
}

/// Policies indexed for evaluation.
#[derive(Debug)]
pub struct PolicyIndex {
    default_action: Action,
    /// In key order; [`RuleRef::policy`] indexes this.
    policies: Vec<AccessPolicy>,
    by_workload: HashMap<ObjectKey, Selected>,
}

/// No policies; the mesh default (Allow) decides.
impl Default for PolicyIndex {
    fn default() -> Self {
        Self::new(Action::Allow, [])
    }
}

impl PolicyIndex {
    pub fn new(default_action: Action, selections: impl IntoIterator<Item = Selection>) -> Self {
        let mut selections: Vec<Selection> = selections.into_iter().collect();
        selections.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        let mut by_workload: HashMap<ObjectKey, Selected> = HashMap::new();
        let mut policies = Vec::with_capacity(selections.len());
        for (index, (policy, selected)) in selections.into_iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            for workload in selected {
                let entry = by_workload.entry(workload).or_default();
                if policy.mode == Mode::Enforce && policy.action == Action::Allow {
                    entry.enforced_allows += 1;
                }
                let buckets = match (policy.mode, policy.action) {
                    (Mode::DryRun, _) => &mut entry.dry_run,
                    (Mode::Enforce, Action::Deny) => &mut entry.deny,
                    (Mode::Enforce, Action::Allow) => &mut entry.allow,
                };
                for (r, rule) in policy.rules.iter().enumerate() {
                    let rule_ref = RuleRef {
                        policy: index,
                        rule: u32::try_from(r).unwrap_or(u32::MAX),
                    };
                    buckets.file(rule_ref, rule);
                }
            }
            policies.push(policy);
        }
        Self {
            default_action,
            policies,
            by_workload,
        }
    }

    pub fn default_action(&self) -> Action {
        self.default_action
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn policies(&self) -> &[AccessPolicy] {
        &self.policies
    }

    pub fn evaluate(&self, destination: &ObjectKey, port: u16, src: &Source<'_>) -> Decision {
        let Some(sel) = self.by_workload.get(destination) else {
            return self.by_default(Vec::new());
        };
        let matching = |b: &'_ Buckets| {
            b.candidates(port)
                .filter(|r| rule_matches(self.rule(*r), port, src))
                .collect::<Vec<_>>()
        };
        let mut dry: Vec<RuleRef> = matching(&sel.dry_run);
        dry.sort();
        dry.dedup_by_key(|r| r.policy);
        let dry_run = dry.into_iter().map(|r| self.hit(r)).collect();

        if let Some(r) = matching(&sel.deny).into_iter().min() {
            return Decision {
                allowed: false,
                decided_by: DecidedBy::Rule(self.hit(r)),
                dry_run,
            };
        }
        if sel.enforced_allows > 0 {
            let decided_by = match matching(&sel.allow).into_iter().min() {
                Some(r) => DecidedBy::Rule(self.hit(r)),
                None => DecidedBy::NoAllowMatched,
            };
            return Decision {
                allowed: matches!(decided_by, DecidedBy::Rule(_)),
                decided_by,
                dry_run,
            };
        }
        self.by_default(dry_run)
    }

    /// The ports on which enforced policy denies every connection from `src` to `destination`,
    /// as sorted, merged ranges. The verdict depends on the port only through port clauses, so
    /// it is constant between consecutive boundaries of the port ranges of the rules that
    /// apply; one evaluation per such interval decides all of it.
    pub fn denied_ports(&self, destination: &ObjectKey, src: &Source<'_>) -> Vec<PortRange> {
        let mut cuts: BTreeSet<u32> = BTreeSet::from([1, 65_536]);
        if let Some(sel) = self.by_workload.get(destination) {
            for r in sel.deny.all().chain(sel.allow.all()) {
                for clause in &self.rule(r).clauses {
                    if let Matcher::Ports(ranges) = &clause.matcher {
                        for range in ranges {
                            cuts.insert(range.first.into());
                            cuts.insert(u32::from(range.last) + 1);
                        }
                    }
                }
            }
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        let mut denied: Vec<PortRange> = Vec::new();
        for interval in cuts.windows(2) {
            let (Ok(first), Ok(last)) =
                (u16::try_from(interval[0]), u16::try_from(interval[1] - 1))
            else {
                continue;
            };
            if self.evaluate(destination, first, src).allowed {
                continue;
            }
            match denied.last_mut() {
                Some(prev) if u32::from(prev.last) + 1 == u32::from(first) => prev.last = last,
                _ => denied.push(PortRange { first, last }),
            }
        }
        denied
    }

    fn by_default(&self, dry_run: Vec<RuleHit>) -> Decision {
        Decision {
            allowed: self.default_action == Action::Allow,
            decided_by: DecidedBy::Default,
            dry_run,
        }
    }

    fn rule(&self, r: RuleRef) -> &Rule {
        &self.policies[r.policy as usize].rules[r.rule as usize]
    }

    fn hit(&self, r: RuleRef) -> RuleHit {
        let p = &self.policies[r.policy as usize];
        RuleHit {
            policy: p.key.clone(),
            rule: r.rule as usize,
            action: p.action,
            mode: p.mode,
        }
    }
}

/// Most ports listed one by one for one destination address in the fast-deny set; beyond
/// that (but short of every port) the destination alone decides.
pub const MAX_FAST_DENY_PORTS: u32 = 64;

/// What the node of `source` may refuse in the kernel, before a connection leaves the pod:
/// `(destination address, port)` pairs, port 0 meaning every port, that enforced policy denies
/// for this client whatever the destination node does. Workload addresses and service VIPs
/// (when every endpoint denies) are included. It is a subset of what the destination denies,
/// by construction: every entry comes from [`PolicyIndex::denied_ports`] with the same inputs
/// the destination will see (the verified identity, the workload's labels, and its address in
/// the destination's family).
pub fn fast_deny(
    config: &Config,
    index: &PolicyIndex,
    source: &Workload,
) -> BTreeSet<(IpAddr, u16)> {
    DenyTargets::new(config, index).fast_deny(config, index, source)
}

/// The destinations a fast-deny set can name, found once per config and used for every
/// source. When the mesh default allows, a workload no policy selects allows everyone, so
/// only selected workloads (and services with such an endpoint) can deny: a mesh with few
/// policies costs little per source, however many workloads it has.
#[derive(Debug)]
pub struct DenyTargets<'a> {
    workloads: Vec<&'a Workload>,
    services: Vec<(&'a Service, Vec<&'a Workload>)>,
}

impl<'a> DenyTargets<'a> {
    pub fn new(config: &'a Config, index: &PolicyIndex) -> Self {
        Self::within(config, index, usize::MAX).unwrap_or(Self {
            workloads: Vec::new(),
            services: Vec::new(),
        })
    }

    /// The targets, unless the workload targets alone, once per source, take more than
    /// `budget` evaluations: then `None`, before the costlier search for services.
    pub fn within(config: &'a Config, index: &PolicyIndex, budget: usize) -> Option<Self> {
        let every = index.default_action == Action::Deny;
        let workloads: Vec<&Workload> = config
            .workloads
            .values()
            .filter(|w| every || index.by_workload.contains_key(&w.key))
            .collect();
        if workloads.len().saturating_mul(config.workloads.len()) > budget {
            return None;
        }
        let services = config
            .services
            .values()
            .filter_map(|s| {
                let endpoints: Vec<&Workload> = config.endpoints(s).collect();
                let can_deny = every
                    || endpoints
                        .iter()
                        .any(|w| index.by_workload.contains_key(&w.key));
                (can_deny && !endpoints.is_empty()).then_some((s, endpoints))
            })
            .collect();
        Some(Self {
            workloads,
            services,
        })
    }

    /// Destinations each source is checked against: the work of one source's set.
    pub fn len(&self) -> usize {
        self.workloads.len() + self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`fast_deny`] for `source`.
    pub fn fast_deny(
        &self,
        config: &Config,
        index: &PolicyIndex,
        source: &Workload,
    ) -> BTreeSet<(IpAddr, u16)> {
        let identity = source.identity(&config.mesh.trust_domain);
        let uri = identity.to_string();
        let mut out = BTreeSet::new();
        for v4 in [true, false] {
            let Some(address) = source.addresses.iter().copied().find(|a| a.is_ipv4() == v4) else {
                continue;
            };
            let src = Source {
                address,
                workload: Some(SourceWorkload::of(source, &identity, &uri)),
            };
            // Destinations left out allow everyone (see the type's comment), so a service
            // with such an endpoint is never denied whole: absent here means allowed.
            let mut denied: HashMap<&ObjectKey, Vec<PortRange>> = HashMap::new();
            for w in &self.workloads {
                let ranges = index.denied_ports(&w.key, &src);
                for a in w.addresses.iter().filter(|a| a.is_ipv4() == v4) {
                    add_ranges(&mut out, *a, &ranges);
                }
                denied.insert(&w.key, ranges);
            }
            for (s, endpoints) in &self.services {
                let endpoints: Vec<&&Workload> = endpoints
                    .iter()
                    .filter(|w| w.addresses.iter().any(|a| a.is_ipv4() == v4))
                    .collect();
                if endpoints.is_empty() {
                    continue;
                }
                for p in &s.ports {
                    let all_deny = endpoints.iter().all(|w| {
                        denied
                            .get(&w.key)
                            .is_some_and(|r| r.iter().any(|r| r.contains(p.target_port)))
                    });
                    if all_deny {
                        for vip in s.vips.iter().filter(|a| a.is_ipv4() == v4) {
                            out.insert((*vip, p.port));
                        }
                    }
                }
            }
        }
        out
    }
}

fn add_ranges(out: &mut BTreeSet<(IpAddr, u16)>, address: IpAddr, ranges: &[PortRange]) {
    let total: u32 = ranges
        .iter()
        .map(|r| u32::from(r.last) - u32::from(r.first) + 1)
        .sum();
    if total == 65_535 {
        out.insert((address, 0));
    } else if total <= MAX_FAST_DENY_PORTS {
        out.extend(
            ranges
                .iter()
                .flat_map(|r| r.first..=r.last)
                .map(|p| (address, p)),
        );
    }
}

/// The evaluation rules as a plain scan of every policy: slow, and obviously right. The index is
/// tested against it; the benchmark uses it as its baseline.
pub mod linear {
    use super::*;

    pub fn evaluate(
        default_action: Action,
        selections: &[Selection],
        destination: &ObjectKey,
        port: u16,
        src: &Source<'_>,
    ) -> Decision {
        let mut ordered: Vec<&Selection> = selections.iter().collect();
        ordered.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        let applies: Vec<&AccessPolicy> = ordered
            .into_iter()
            .filter(|(_, selected)| selected.contains(destination))
            .map(|(p, _)| p)
            .collect();
        let first_match = |p: &AccessPolicy| {
            p.rules
                .iter()
                .position(|r| rule_matches(r, port, src))
                .map(|rule| RuleHit {
                    policy: p.key.clone(),
                    rule,
                    action: p.action,
                    mode: p.mode,
                })
        };
        let dry_run: Vec<RuleHit> = applies
            .iter()
            .filter(|p| p.mode == Mode::DryRun)
            .filter_map(|p| first_match(p))
            .collect();
        let enforced = |action| {
            applies
                .iter()
                .filter(move |p| p.mode == Mode::Enforce && p.action == action)
        };
        if let Some(hit) = enforced(Action::Deny).find_map(|p| first_match(p)) {
            return Decision {
                allowed: false,
                decided_by: DecidedBy::Rule(hit),
                dry_run,
            };
        }
        if enforced(Action::Allow).next().is_some() {
            return match enforced(Action::Allow).find_map(|p| first_match(p)) {
                Some(hit) => Decision {
                    allowed: true,
                    decided_by: DecidedBy::Rule(hit),
                    dry_run,
                },
                None => Decision {
                    allowed: false,
                    decided_by: DecidedBy::NoAllowMatched,
                    dry_run,
                },
            };
        }
        Decision {
            allowed: default_action == Action::Allow,
            decided_by: DecidedBy::Default,
            dry_run,
        }
    }
}
