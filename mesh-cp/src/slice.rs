//! What one node may see of the configuration, and how two such views differ, in the plainest
//! terms: one node at a time, from scratch. Streams are served from [`crate::distribute`],
//! which builds the same thing once for all nodes and is tested against this.
//!
//! A node gets the mesh settings, the trust bundle, every workload (the netns path only for its
//! own) and every service with its resolved endpoints: enough to capture its pods and to route
//! to any destination. Netns paths of other nodes' workloads are host details it has no use for.
//! Access policies go only to nodes where they select a workload, with the keys of those
//! workloads: the node enforces inbound and needs nothing else. Each local workload also gets
//! its fast-deny set: the connects its node may refuse in the kernel.

use std::collections::BTreeMap;

use mesh_api::{keys, v1};
use mesh_model::{
    authz::{fast_deny, PolicyIndex},
    Config,
};
use rustls_pki_types::CertificateDer;

pub type Slice = BTreeMap<String, v1::Resource>;

/// `index` is `config`'s policies, indexed (once per config, not per node).
pub fn node_slice(
    config: &Config,
    index: &PolicyIndex,
    roots: &[CertificateDer<'_>],
    node: &str,
) -> Slice {
    let mut out = Slice::new();
    let mut put = |key: String, kind: v1::resource::Kind| {
        out.insert(
            key.clone(),
            v1::Resource {
                key,
                kind: Some(kind),
            },
        );
    };
    put(
        keys::MESH.into(),
        v1::resource::Kind::Mesh((&config.mesh).into()),
    );
    put(
        keys::TRUST_BUNDLE.into(),
        v1::resource::Kind::TrustBundle(v1::TrustBundle {
            roots_der: roots.iter().map(|r| r.to_vec()).collect(),
        }),
    );
    for w in config.workloads.values() {
        let local = w.node == node;
        put(
            keys::workload(&w.key.namespace, &w.key.name),
            v1::resource::Kind::Workload(v1::Workload {
                netns: if local {
                    w.netns.to_string_lossy().into_owned()
                } else {
                    String::new()
                },
                identity: w.identity(&config.mesh.trust_domain).to_string(),
                ..w.into()
            }),
        );
    }
    for s in config.services.values() {
        put(
            keys::service(&s.key.namespace, &s.key.name),
            v1::resource::Kind::Service(v1::Service {
                endpoints: config.endpoints(s).map(|w| w.key.to_string()).collect(),
                ..s.into()
            }),
        );
    }
    // Fast-deny needs every destination's policies, not only this node's.
    for w in config.workloads_on(node) {
        let entries: Vec<v1::FastDenyEntry> = fast_deny(config, index, w)
            .into_iter()
            .map(v1::FastDenyEntry::from)
            .collect();
        if !entries.is_empty() {
            put(
                keys::fast_deny(&w.key.namespace, &w.key.name),
                v1::resource::Kind::FastDeny(v1::FastDeny {
                    namespace: w.key.namespace.clone(),
                    name: w.key.name.clone(),
                    entries,
                }),
            );
        }
    }
    for p in config.policies.values() {
        let selected: Vec<String> = config
            .selected_by(p)
            .filter(|w| w.node == node)
            .map(|w| w.key.to_string())
            .collect();
        if !selected.is_empty() {
            put(
                keys::policy(&p.key.namespace, &p.key.name),
                v1::resource::Kind::Policy(v1::AccessPolicy {
                    selected,
                    ..p.into()
                }),
            );
        }
    }
    // Traffic policies and routes go to every node: sources and endpoints are everywhere.
    for p in config.traffic_policies.values() {
        put(
            keys::traffic_policy(&p.key.namespace, &p.key.name),
            v1::resource::Kind::TrafficPolicy(p.into()),
        );
    }
    for r in config.routes.values() {
        put(
            keys::route(&r.key.namespace, &r.key.name),
            v1::resource::Kind::Route(r.into()),
        );
    }
    out
}

/// Resources of `new` that are absent from or different in `old`, and keys only `old` has.
pub fn diff(old: &Slice, new: &Slice) -> (Vec<v1::Resource>, Vec<String>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let removals = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (upserts, removals)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: a, labels: {{app: a}}}}\nspec: {{node: n1, netns: /run/netns/a, addresses: [10.0.0.1]}}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: b, labels: {{app: b}}}}\nspec: {{node: n2, netns: /run/netns/b, addresses: [10.0.0.2]}}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{name: b}}\nspec: {{vips: [10.96.0.1], ports: [{{port: 80}}], selector: {{app: b}}}}\n{extra}"
        );
        mesh_model::parse(&[(PathBuf::from("c.yaml"), text)]).unwrap()
    }

    fn slice_of(config: &Config, node: &str) -> Slice {
        let index = PolicyIndex::new(config.mesh.default_action, config.selections());
        node_slice(config, &index, &[], node)
    }

    fn workload(s: &Slice, key: &str) -> v1::Workload {
        match s[key].kind.clone() {
            Some(v1::resource::Kind::Workload(w)) => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn netns_paths_only_for_the_nodes_own_workloads() {
        let s = slice_of(&config(""), "n1");
        assert_eq!(workload(&s, "workload/default/a").netns, "/run/netns/a");
        assert_eq!(workload(&s, "workload/default/b").netns, "");
        assert_eq!(
            workload(&s, "workload/default/b").identity,
            "spiffe://cluster.local/ns/default/sa/default"
        );
        match &s["service/default/b"].kind {
            Some(v1::resource::Kind::Service(svc)) => assert_eq!(svc.endpoints, ["default/b"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn traffic_policies_and_routes_go_to_every_node() {
        let extra = "---\napiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: tp}\nspec: {services: [b], loadBalancer: LeastConnections}\n---\napiVersion: mycel.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r}\nspec: {service: b, backends: [{service: b, weight: 1}]}\n";
        let c = config(extra);
        for node in ["n1", "n2", "n3"] {
            let s = slice_of(&c, node);
            assert!(matches!(
                &s["traffic-policy/default/tp"].kind,
                Some(v1::resource::Kind::TrafficPolicy(p)) if p.load_balancer == v1::LoadBalancer::LeastConnections as i32
            ));
            assert!(matches!(
                &s["route/default/r"].kind,
                Some(v1::resource::Kind::Route(_))
            ));
        }
    }

    #[test]
    fn diff_has_only_what_changed() {
        let before = slice_of(&config(""), "n1");
        let (up, rm) = diff(&before, &before);
        assert!(up.is_empty() && rm.is_empty());

        let added = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: c, labels: {app: b}}\nspec: {node: n2, netns: /run/netns/c, addresses: [10.0.0.3]}\n";
        let after = slice_of(&config(added), "n1");
        let (up, rm) = diff(&before, &after);
        let keys: Vec<_> = up.iter().map(|r| r.key.as_str()).collect();
        // The new workload, and the service whose endpoints it joined.
        assert_eq!(keys, ["service/default/b", "workload/default/c"]);
        assert!(rm.is_empty());
        let (up, rm) = diff(&after, &before);
        assert_eq!(up.len(), 1);
        assert_eq!(rm, ["workload/default/c"]);
    }

    #[test]
    fn policies_go_only_where_they_select_a_workload() {
        let policy = "---\napiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: only-b}\nspec: {selector: {matchLabels: {app: b}}, action: Deny, rules: [{ports: [80]}]}\n";
        let c = config(policy);
        assert!(!slice_of(&c, "n1").contains_key("policy/default/only-b"));
        match &slice_of(&c, "n2")["policy/default/only-b"].kind {
            Some(v1::resource::Kind::Policy(p)) => assert_eq!(p.selected, ["default/b"]),
            other => panic!("{other:?}"),
        }
        // Everyone is denied b:80, so a (on n1) gets fast-deny entries, and so does b (on n2)
        // for connects to itself.
        match &slice_of(&c, "n1")["fast-deny/default/a"].kind {
            Some(v1::resource::Kind::FastDeny(f)) => {
                assert_eq!(f.entries.len(), 2, "{f:?}"); // b:80, and the VIP 10.96.0.1:80 -> b:80
            }
            other => panic!("{other:?}"),
        }
        let n2_keys: Vec<String> = slice_of(&c, "n2").into_keys().collect();
        assert!(
            n2_keys.contains(&"fast-deny/default/b".to_string()),
            "{n2_keys:?}"
        );
        // Adding a workload the policy selects on n2 changes the policy's resource there.
        let added = "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: c, labels: {app: b}}\nspec: {node: n2, netns: /run/netns/c, addresses: [10.0.0.3]}\n";
        let before = slice_of(&c, "n2");
        let after = slice_of(&config(&format!("{policy}{added}")), "n2");
        let (up, rm) = diff(&before, &after);
        let keys: Vec<_> = up.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "fast-deny/default/b",
                "fast-deny/default/c",
                "policy/default/only-b",
                "service/default/b",
                "workload/default/c"
            ]
        );
        assert!(rm.is_empty());
    }
}
