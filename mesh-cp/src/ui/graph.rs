//! The dashboard's service graph: applications as nodes (every replica of one is one node, as
//! in the metrics), the traffic between them as edges, and the pairs a policy denies whatever
//! happens as edges of their own, from the same evaluation the destination's node runs.

use std::collections::{BTreeMap, BTreeSet};

use mesh_model::{
    authz::{PolicyIndex, Source, SourceWorkload},
    Action, Config, Workload,
};
use mesh_telemetry::traffic::Pair;
use serde::Serialize;

/// Applications drawn at most: past that, the graph keeps those with traffic or a deny
/// first, and says it left some out.
pub const MAX_APPLICATIONS: usize = 300;

/// Source × destination pairs evaluated for the denied pairs at most (each costs a policy
/// evaluation per port range its destination's policies name); past that they are left out,
/// and the graph says so. They are evaluated once per config version.
pub const DENY_BUDGET: usize = 250_000;

#[derive(Debug, Serialize)]
pub struct Graph {
    pub config_version: u64,
    pub applications: Vec<Application>,
    /// Traffic between applications, as the source's node reports it.
    pub edges: Vec<Pair>,
    pub denied: Vec<Denied>,
    pub traffic: TrafficSource,
    /// Applications left out past [`MAX_APPLICATIONS`].
    pub left_out: usize,
    /// Why no denied pair is drawn, when none is for a reason other than there being none.
    pub denied_not_shown: Option<&'static str>,
}

/// The denied pairs of a config, or why they are not evaluated.
#[derive(Debug, Default)]
pub struct DeniedPairs {
    pub pairs: Vec<Denied>,
    pub not_shown: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Application {
    /// `namespace/application`, as the metrics' pairs name it.
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// Its replicas (workload keys) and the nodes they are placed on.
    pub workloads: Vec<String>,
    pub nodes: BTreeSet<String>,
}

/// A pair of applications whose connections a policy denies on some ports, whatever else
/// happens: the source's node refuses them in its kernel.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Denied {
    pub source: String,
    pub destination: String,
    /// `8080`, `9000-9100`, or `all`.
    pub ports: Vec<String>,
}

/// Where the traffic figures came from, when, and what could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficSource {
    /// `prometheus` or `nodes`.
    pub from: &'static str,
    pub read_at: String,
    pub errors: Vec<String>,
}

/// The graph of `config` with `edges` from the traffic and `denied` (from [`denied_pairs`]).
pub fn build(
    config: &Config,
    version: u64,
    edges: &[Pair],
    denied: &DeniedPairs,
    traffic: TrafficSource,
) -> Graph {
    let mut apps: BTreeMap<String, Application> = BTreeMap::new();
    for w in config.workloads.values() {
        let id = app_id(w);
        let app = apps.entry(id.clone()).or_insert_with(|| Application {
            id,
            namespace: w.key.namespace.clone(),
            name: w.application().to_owned(),
            workloads: Vec::new(),
            nodes: BTreeSet::new(),
        });
        app.workloads.push(w.key.to_string());
        app.nodes.insert(w.node.clone());
    }
    // Past the cap: those with traffic first, then those with a deny, then by name.
    let left_out = apps.len().saturating_sub(MAX_APPLICATIONS);
    if left_out > 0 {
        let with_traffic: BTreeSet<&str> = edges
            .iter()
            .flat_map(|e| [e.source.as_str(), e.destination.as_str()])
            .collect();
        let with_deny: BTreeSet<&str> = denied
            .pairs
            .iter()
            .flat_map(|d| [d.source.as_str(), d.destination.as_str()])
            .collect();
        let rank = |id: &str| match (with_traffic.contains(id), with_deny.contains(id)) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        };
        let mut order: Vec<&String> = apps.keys().collect();
        order.sort_by_key(|id| rank(id));
        let keep: BTreeSet<String> = order.into_iter().take(MAX_APPLICATIONS).cloned().collect();
        apps.retain(|id, _| keep.contains(id));
    }
    let shown = |id: &str| apps.contains_key(id);
    let edges = edges
        .iter()
        .filter(|e| shown(&e.source) && shown(&e.destination))
        .cloned()
        .collect();
    let shown_denied = denied
        .pairs
        .iter()
        .filter(|d| shown(&d.source) && shown(&d.destination))
        .map(|d| Denied {
            source: d.source.clone(),
            destination: d.destination.clone(),
            ports: d.ports.clone(),
        })
        .collect();
    Graph {
        config_version: version,
        applications: apps.into_values().collect(),
        edges,
        denied: shown_denied,
        traffic,
        left_out,
        denied_not_shown: denied.not_shown,
    }
}

fn app_id(w: &Workload) -> String {
    format!("{}/{}", w.key.namespace, w.application())
}

/// The pairs of applications some of whose replicas' connections are denied on some ports
/// whatever happens, as the destination's node decides it (the fast-deny evaluation).
///
/// A mesh that denies by default denies every pair no policy allows: drawing those says
/// nothing a policy says, so then none is drawn.
pub fn denied_pairs(config: &Config) -> DeniedPairs {
    if config.mesh.default_action == Action::Deny {
        return DeniedPairs {
            pairs: Vec::new(),
            not_shown: Some("the mesh denies by default (MeshConfig defaultAction: Deny): only traffic is drawn"),
        };
    }
    let selections = config.selections();
    // With a mesh that allows by default, only workloads a policy selects can deny.
    let selected: BTreeSet<mesh_model::ObjectKey> = selections
        .iter()
        .flat_map(|(_, keys)| keys.iter().cloned())
        .collect();
    let index = PolicyIndex::new(config.mesh.default_action, selections);
    let destinations: Vec<&Workload> = config
        .workloads
        .values()
        .filter(|w| selected.contains(&w.key))
        .collect();
    if destinations.len().saturating_mul(config.workloads.len()) > DENY_BUDGET {
        return DeniedPairs {
            pairs: Vec::new(),
            not_shown: Some("too many workloads selected by policies to evaluate every pair here"),
        };
    }
    let trust_domain = &config.mesh.trust_domain;
    let mut pairs: BTreeMap<(String, String), BTreeSet<(u16, u16)>> = BTreeMap::new();
    for source in config.workloads.values() {
        let identity = source.identity(trust_domain);
        let uri = identity.to_string();
        let Some(address) = source.addresses.first().copied() else {
            continue;
        };
        let src = Source {
            address,
            workload: Some(SourceWorkload::of(source, &identity, &uri)),
        };
        for d in &destinations {
            let ranges = index.denied_ports(&d.key, &src);
            if ranges.is_empty() {
                continue;
            }
            pairs
                .entry((app_id(source), app_id(d)))
                .or_default()
                .extend(ranges.iter().map(|r| (r.first, r.last)));
        }
    }
    let pairs = pairs
        .into_iter()
        .map(|((source, destination), ranges)| Denied {
            source,
            destination,
            ports: ranges
                .into_iter()
                .map(|(first, last)| match (first, last) {
                    (1, u16::MAX) | (0, u16::MAX) => "all".to_owned(),
                    (a, b) if a == b => a.to_string(),
                    (a, b) => format!("{a}-{b}"),
                })
                .collect(),
        })
        .collect();
    DeniedPairs {
        pairs,
        not_shown: None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config(policy: &str) -> Config {
        let w = |name: &str, app: &str, ip: &str| {
            format!("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\nspec: {{node: n1, netns: /run/netns/{name}, addresses: ['{ip}'], serviceAccount: {app}}}\n---\n")
        };
        let text = format!(
            "{}{}{}{}{policy}",
            w("order-1", "order", "10.0.1.2"),
            w("order-2", "order", "10.0.1.4"),
            w("analytics", "analytics", "10.0.1.3"),
            w("payment", "payment", "10.0.2.2"),
        );
        mesh_model::parse(&[(PathBuf::from("c.yaml"), text)]).unwrap()
    }

    fn none() -> TrafficSource {
        TrafficSource {
            from: "nodes",
            read_at: String::new(),
            errors: Vec::new(),
        }
    }

    #[test]
    fn replicas_are_one_application_and_a_deny_is_an_edge() {
        let c = config("apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: block, namespace: shop}\nspec: {selector: {matchLabels: {app: payment}}, action: Deny, rules: [{sourceIdentities: ['spiffe://cluster.local/ns/shop/sa/analytics'], ports: [8080]}]}\n");
        let g = build(&c, 7, &[], &denied_pairs(&c), none());
        let ids: Vec<&str> = g.applications.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["shop/analytics", "shop/order", "shop/payment"]);
        assert_eq!(
            g.applications[1].workloads,
            ["shop/order-1", "shop/order-2"]
        );
        assert_eq!(
            g.denied,
            [Denied {
                source: "shop/analytics".into(),
                destination: "shop/payment".into(),
                ports: vec!["8080".into()],
            }]
        );
    }

    #[test]
    fn without_a_deny_nothing_is_denied() {
        let c = config("");
        let g = build(&c, 1, &[], &denied_pairs(&c), none());
        assert!(g.denied.is_empty() && g.denied_not_shown.is_none());
    }

    #[test]
    fn a_mesh_that_denies_by_default_draws_no_denied_pair() {
        let c = config("apiVersion: mycel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {defaultAction: Deny}\n");
        let d = denied_pairs(&c);
        assert!(d.pairs.is_empty() && d.not_shown.is_some(), "{d:?}");
    }
}
