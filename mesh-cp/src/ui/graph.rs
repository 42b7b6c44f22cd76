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

/// Source × destination evaluations spent on the denied pairs at most (one policy check
/// each); past that they are left out, and the graph says so.
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
    /// Whether the denied pairs were over [`DENY_BUDGET`] and are not shown.
    pub denied_over_budget: bool,
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

/// The graph of `config` with `edges` from the traffic.
pub fn build(config: &Config, version: u64, edges: Vec<Pair>, traffic: TrafficSource) -> Graph {
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
    let (denied, denied_over_budget) = denied_pairs(config);
    // Past the cap, those that take part in an edge first, then by name.
    let left_out = apps.len().saturating_sub(MAX_APPLICATIONS);
    if left_out > 0 {
        let busy: BTreeSet<&str> = edges
            .iter()
            .flat_map(|e| [e.source.as_str(), e.destination.as_str()])
            .chain(
                denied
                    .iter()
                    .flat_map(|d| [d.source.as_str(), d.destination.as_str()]),
            )
            .collect();
        let mut keep: Vec<String> = apps
            .keys()
            .filter(|id| busy.contains(id.as_str()))
            .chain(apps.keys().filter(|id| !busy.contains(id.as_str())))
            .take(MAX_APPLICATIONS)
            .cloned()
            .collect();
        keep.sort();
        let keep: BTreeSet<String> = keep.into_iter().collect();
        apps.retain(|id, _| keep.contains(id));
    }
    let shown = |id: &str| apps.contains_key(id);
    let edges = edges
        .into_iter()
        .filter(|e| shown(&e.source) && shown(&e.destination))
        .collect();
    let denied = denied
        .into_iter()
        .filter(|d| shown(&d.source) && shown(&d.destination))
        .collect();
    Graph {
        config_version: version,
        applications: apps.into_values().collect(),
        edges,
        denied,
        traffic,
        left_out,
        denied_over_budget,
    }
}

fn app_id(w: &Workload) -> String {
    format!("{}/{}", w.key.namespace, w.application())
}

/// The pairs of applications some of whose replicas' connections are denied on some ports
/// whatever happens, as the destination's node decides it (the fast-deny evaluation).
fn denied_pairs(config: &Config) -> (Vec<Denied>, bool) {
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
        .filter(|w| config.mesh.default_action == Action::Deny || selected.contains(&w.key))
        .collect();
    if destinations.len().saturating_mul(config.workloads.len()) > DENY_BUDGET {
        return (Vec::new(), true);
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
    let denied = pairs
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
    (denied, false)
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
        let g = build(&c, 7, Vec::new(), none());
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
        let g = build(&config(""), 1, Vec::new(), none());
        assert!(g.denied.is_empty() && !g.denied_over_budget);
    }
}
