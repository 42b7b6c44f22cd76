//! The node's view of the mesh, built from the control plane's config stream: the first
//! message of a stream replaces it, later ones patch it. The view a stream has built is the base
//! its next diff applies to, so it is kept even when enrolling what it describes fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use mesh_api::{
    convert::decode_enum,
    keys,
    v1::{self, resource::Kind, ConfigUpdate},
};

use mesh_model::{
    authz::Selection,
    traffic::{ServiceRoute, TrafficPolicy},
    Action, LocalHop, MtlsMode, ObjectKey, Transport,
};

use crate::workloads::{Workload, WorkloadId};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshView {
    /// 0 until the first snapshot arrives.
    pub version: u64,
    pub mesh: v1::MeshSettings,
    /// The policy part of `mesh`, decoded once when it arrives.
    pub mesh_policy: MeshPolicy,
    pub trust_roots: Vec<Vec<u8>>,
    pub workloads: BTreeMap<WorkloadId, v1::Workload>,
    pub services: BTreeMap<ObjectKey, v1::Service>,
    /// Access policies that select workloads of this node, decoded.
    pub policies: BTreeMap<ObjectKey, Selection>,
    /// Connects to refuse in the kernel, by local workload: destination address and port
    /// (0: every port).
    pub fast_deny: BTreeMap<WorkloadId, Vec<(IpAddr, u16)>>,
    /// Every traffic policy of the mesh, decoded.
    pub traffic_policies: BTreeMap<ObjectKey, Arc<TrafficPolicy>>,
    /// Every service route of the mesh, decoded.
    pub routes: BTreeMap<ObjectKey, ServiceRoute>,
    /// This node takes other nodes' workloads on demand: it holds its own and those it asked
    /// for, and what it does not hold is asked for, never taken as outside the mesh.
    pub on_demand: bool,
    /// On demand: addresses the control plane said no workload has (canonical). A workload
    /// that takes one later arrives, and the address leaves this set.
    pub absent: BTreeSet<IpAddr>,
    /// On demand: workloads asked for by key that do not exist (a Service may list an
    /// endpoint that is gone).
    pub absent_workloads: BTreeSet<WorkloadId>,
}

/// Mesh-wide settings of enforcement and of the data path. The default (no settings yet, or
/// offline mode) allows everything and polices plaintext permissively, as a mesh without
/// policies does, and tunnels over TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshPolicy {
    pub default_action: Action,
    pub mtls: MtlsMode,
    /// Workload ports that take plaintext untouched.
    pub plaintext_ports: Vec<u16>,
    /// What this node's pods use for tunnels to other nodes.
    pub transport: Transport,
    /// How bytes cross the hop between this node's pods' applications and the proxy.
    pub local_hop: LocalHop,
    /// Whose traffic policies apply to every Service.
    pub root_namespace: String,
}

impl Default for MeshPolicy {
    fn default() -> Self {
        Self {
            default_action: Action::Allow,
            mtls: MtlsMode::default(),
            plaintext_ports: Vec::new(),
            transport: Transport::default(),
            local_hop: LocalHop::default(),
            root_namespace: mesh_model::DEFAULT_ROOT_NAMESPACE.into(),
        }
    }
}

impl MeshPolicy {
    fn decode(m: &v1::MeshSettings) -> Result<Self, String> {
        Ok(Self {
            default_action: decode_enum::<v1::PolicyAction, _>(m.default_action)
                .map_err(|e| format!("default action: {e}"))?,
            mtls: decode_enum::<v1::MtlsMode, _>(m.mtls_mode).map_err(|e| e.to_string())?,
            plaintext_ports: m
                .plaintext_ports
                .iter()
                .map(|p| {
                    u16::try_from(*p).map_err(|_| format!("plaintext port {p} is out of range"))
                })
                .collect::<Result<_, _>>()?,
            transport: decode_enum::<v1::Transport, _>(m.transport).map_err(|e| e.to_string())?,
            // A value this build does not know (a newer control plane's) chooses a data path,
            // not a policy: the hop stays on TCP rather than the whole config being refused.
            local_hop: decode_enum::<v1::LocalHop, _>(m.local_hop).unwrap_or(LocalHop::Tcp),
            // An older control plane sends none: the default root namespace.
            root_namespace: if m.root_namespace.is_empty() {
                mesh_model::DEFAULT_ROOT_NAMESPACE.into()
            } else {
                m.root_namespace.clone()
            },
        })
    }
}

impl MeshView {
    /// The view after `update`, or why the update cannot be applied (the view is unchanged).
    pub fn apply(&self, update: ConfigUpdate) -> Result<MeshView, String> {
        let mut next = if update.snapshot {
            MeshView {
                on_demand: self.on_demand,
                ..MeshView::default()
            }
        } else {
            if self.version == 0 {
                return Err("an incremental update arrived before any snapshot".into());
            }
            self.clone()
        };
        next.version = update.version;
        for resource in update.upserts {
            let key = resource.key;
            // What a removal could not name, an upsert may not add: it would stay for good.
            let singleton = matches!(resource.kind, Some(Kind::Mesh(_) | Kind::TrustBundle(_)));
            if !singleton && keys::parse(&key).is_none() {
                return Err(format!(
                    "resource {key:?}: the key is not kind/namespace/name"
                ));
            }
            match resource.kind {
                Some(Kind::Mesh(m)) if key == keys::MESH => {
                    next.mesh_policy = MeshPolicy::decode(&m).map_err(|e| format!("{key}: {e}"))?;
                    next.mesh = m
                }
                Some(Kind::TrustBundle(t)) if key == keys::TRUST_BUNDLE => {
                    next.trust_roots = t.roots_der
                }
                Some(Kind::Workload(w)) if key == keys::workload(&w.namespace, &w.name) => {
                    check_addresses(&key, &w.addresses)?;
                    for a in w
                        .addresses
                        .iter()
                        .filter_map(|a| mesh_api::ip_from_bytes(a))
                    {
                        next.absent.remove(&a.to_canonical());
                    }
                    let id = WorkloadId::new(&w.namespace, &w.name);
                    next.absent_workloads.remove(&id);
                    next.workloads.insert(id, w);
                }
                Some(Kind::Service(s)) if key == keys::service(&s.namespace, &s.name) => {
                    check_addresses(&key, &s.vips)?;
                    next.services
                        .insert(ObjectKey::new(&s.namespace, &s.name), s);
                }
                Some(Kind::Policy(p)) if key == keys::policy(&p.namespace, &p.name) => {
                    let decoded = Selection::try_from(&p).map_err(|e| e.to_string())?;
                    next.policies
                        .insert(ObjectKey::new(&p.namespace, &p.name), decoded);
                }
                Some(Kind::FastDeny(f)) if key == keys::fast_deny(&f.namespace, &f.name) => {
                    let entries = f
                        .entries
                        .iter()
                        .map(|e| {
                            let ip = mesh_api::ip_from_bytes(&e.address);
                            let port = u16::try_from(e.port).ok();
                            ip.zip(port).ok_or_else(|| {
                                format!("{key}: an entry with a bad address or port {}", e.port)
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    next.fast_deny
                        .insert(WorkloadId::new(&f.namespace, &f.name), entries);
                }
                Some(Kind::TrafficPolicy(p))
                    if key == keys::traffic_policy(&p.namespace, &p.name) =>
                {
                    let decoded = TrafficPolicy::try_from(&p).map_err(|e| e.to_string())?;
                    next.traffic_policies
                        .insert(decoded.key.clone(), Arc::new(decoded));
                }
                Some(Kind::Route(r)) if key == keys::route(&r.namespace, &r.name) => {
                    let decoded = ServiceRoute::try_from(&r).map_err(|e| e.to_string())?;
                    next.routes.insert(decoded.key.clone(), decoded);
                }
                other => {
                    return Err(format!(
                        "resource {key:?} does not match its contents ({})",
                        other.map_or("empty", kind_name)
                    ))
                }
            }
        }
        for key in update.removals {
            // A removal of something this node never held changes nothing, whatever its key.
            match keys::parse(&key) {
                Some((keys::Kind::Workload, k)) => {
                    let held = next.workloads.remove(&k).map(drop);
                    // On demand, the answer for a workload asked for that does not exist:
                    // known absent, so that nothing waits for it again.
                    if held.is_none() && next.on_demand {
                        next.absent_workloads.insert(k);
                    }
                    held
                }
                Some((keys::Kind::Service, k)) => next.services.remove(&k).map(drop),
                Some((keys::Kind::Policy, k)) => next.policies.remove(&k).map(drop),
                Some((keys::Kind::FastDeny, k)) => next.fast_deny.remove(&k).map(drop),
                Some((keys::Kind::TrafficPolicy, k)) => next.traffic_policies.remove(&k).map(drop),
                Some((keys::Kind::Route, k)) => next.routes.remove(&k).map(drop),
                None => None,
            };
        }
        for raw in &update.absent {
            let ip = mesh_api::ip_from_bytes(raw)
                .ok_or_else(|| format!("an absent address of {} bytes", raw.len()))?;
            next.absent.insert(ip.to_canonical());
        }
        if next.trust_roots.is_empty() {
            return Err("the config has no trust bundle".into());
        }
        Ok(next)
    }

    /// The workloads to capture on `node`.
    pub fn local_workloads(&self, node: &str) -> BTreeMap<WorkloadId, Workload> {
        self.workloads
            .iter()
            .filter(|(_, w)| w.node == node && !w.netns.is_empty())
            .map(|(id, w)| {
                let workload = Workload {
                    id: id.clone(),
                    netns: PathBuf::from(&w.netns),
                };
                (id.clone(), workload)
            })
            .collect()
    }

    /// SPIFFE IDs of the workloads placed on `node`: the certificates this node needs.
    pub fn local_identities(&self, node: &str) -> BTreeSet<String> {
        self.workloads
            .values()
            .filter(|w| w.node == node)
            .map(|w| w.identity.clone())
            .collect()
    }
}

fn check_addresses(key: &str, addrs: &[Vec<u8>]) -> Result<(), String> {
    match addrs.iter().find(|a| mesh_api::ip_from_bytes(a).is_none()) {
        Some(bad) => Err(format!("{key}: an address of {} bytes", bad.len())),
        None => Ok(()),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Mesh(_) => "mesh settings",
        Kind::TrustBundle(_) => "trust bundle",
        Kind::Workload(_) => "a workload",
        Kind::Service(_) => "a service",
        Kind::Policy(_) => "an access policy",
        Kind::FastDeny(_) => "fast-deny entries",
        Kind::TrafficPolicy(_) => "a traffic policy",
        Kind::Route(_) => "a service route",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: &str, netns: &str) -> v1::Resource {
        v1::Resource {
            key: keys::workload("default", name),
            kind: Some(Kind::Workload(v1::Workload {
                namespace: "default".into(),
                name: name.into(),
                node: node.into(),
                netns: netns.into(),
                addresses: vec![vec![10, 0, 0, 1]],
                identity: format!("spiffe://td/ns/default/sa/{name}"),
                labels: Default::default(),
            })),
        }
    }

    fn bundle() -> v1::Resource {
        v1::Resource {
            key: keys::TRUST_BUNDLE.into(),
            kind: Some(Kind::TrustBundle(v1::TrustBundle {
                roots_der: vec![vec![1]],
            })),
        }
    }

    fn update(
        version: u64,
        snapshot: bool,
        upserts: Vec<v1::Resource>,
        removals: &[&str],
    ) -> ConfigUpdate {
        ConfigUpdate {
            version,
            snapshot,
            upserts,
            removals: removals.iter().map(|s| s.to_string()).collect(),
            more: false,
            epoch: 1,
            absent: Vec::new(),
        }
    }

    #[test]
    fn on_demand_answers_are_held_until_a_workload_takes_them() {
        let on_demand = MeshView {
            on_demand: true,
            ..MeshView::default()
        };
        let mut first = update(1, true, vec![bundle()], &[]);
        first.absent = vec![vec![10, 0, 0, 1], vec![10, 0, 0, 9]];
        let v = on_demand.apply(first).unwrap();
        assert!(v.on_demand);
        assert_eq!(v.absent.len(), 2);
        let v = v
            .apply(update(1, false, vec![], &["workload/default/nope"]))
            .unwrap();
        assert!(v
            .absent_workloads
            .contains(&WorkloadId::new("default", "nope")));
        // A workload that arrives (with 10.0.0.1) ends both answers.
        let v = v
            .apply(update(2, false, vec![workload("nope", "n2", "")], &[]))
            .unwrap();
        assert!(!v.absent.contains(&"10.0.0.1".parse().unwrap()));
        assert!(v.absent_workloads.is_empty());
        // A snapshot replaces the answers too, and the view stays on demand.
        let v = v.apply(update(3, true, vec![bundle()], &[])).unwrap();
        assert!(v.on_demand && v.absent.is_empty());
        let mut bad = update(4, false, vec![], &[]);
        bad.absent = vec![vec![1, 2, 3]];
        assert!(v.apply(bad).is_err());
        // Not on demand, a removal of what is not held is nothing.
        let full = MeshView::default()
            .apply(update(1, true, vec![bundle()], &["workload/default/x"]))
            .unwrap();
        assert!(full.absent_workloads.is_empty());
    }

    #[test]
    fn snapshot_then_patches() {
        let v = MeshView::default()
            .apply(update(
                1,
                true,
                vec![bundle(), workload("a", "n1", "/a"), workload("b", "n2", "")],
                &[],
            ))
            .unwrap();
        assert_eq!(v.local_workloads("n1").len(), 1);
        assert_eq!(v.local_identities("n1").len(), 1);
        let v = v
            .apply(update(
                2,
                false,
                vec![workload("c", "n1", "/c")],
                &["workload/default/a"],
            ))
            .unwrap();
        let local: Vec<_> = v
            .local_workloads("n1")
            .into_keys()
            .map(|k| k.name)
            .collect();
        assert_eq!(local, ["c"]);
        assert_eq!(v.workloads.len(), 2);
        // A new snapshot forgets everything before it.
        let v = v.apply(update(3, true, vec![bundle()], &[])).unwrap();
        assert!(v.workloads.is_empty());
    }

    #[test]
    fn rejects_inconsistent_updates() {
        assert!(MeshView::default()
            .apply(update(1, false, vec![bundle()], &[]))
            .is_err());
        assert!(MeshView::default()
            .apply(update(1, true, vec![], &[]))
            .is_err());
        let mut wrong_key = workload("a", "n1", "/a");
        wrong_key.key = "workload/default/zzz".into();
        assert!(MeshView::default()
            .apply(update(1, true, vec![bundle(), wrong_key], &[]))
            .is_err());
        // A key a removal could not name: a name with a '/' or no namespace.
        for (namespace, name) in [("default", "a/b"), ("", "a")] {
            let mut unnamed = workload("a", "n1", "/a");
            if let Some(Kind::Workload(w)) = &mut unnamed.kind {
                (w.namespace, w.name) = (namespace.into(), name.into());
            }
            unnamed.key = keys::workload(namespace, name);
            let err = MeshView::default()
                .apply(update(1, true, vec![bundle(), unnamed], &[]))
                .expect_err("a key no removal can name");
            assert!(err.contains("not kind/namespace/name"), "{err}");
        }
        let mut bad_addr = workload("a", "n1", "/a");
        if let Some(Kind::Workload(w)) = &mut bad_addr.kind {
            w.addresses = vec![vec![1, 2, 3]];
        }
        assert!(MeshView::default()
            .apply(update(1, true, vec![bundle(), bad_addr], &[]))
            .is_err());
    }

    #[test]
    fn traffic_policies_and_routes_come_and_go() {
        let policy = v1::TrafficPolicy {
            namespace: "shop".into(),
            name: "tp".into(),
            connect: Some(v1::ConnectSettings {
                timeout_ms: 500,
                max_attempts: 2,
                backoff_ms: 0,
            }),
            ..Default::default()
        };
        let route = v1::ServiceRoute {
            namespace: "shop".into(),
            name: "r".into(),
            service: "pay".into(),
            port: 0,
            backends: vec![v1::RouteBackend {
                service: "pay-v2".into(),
                port: 0,
                weight: 1,
            }],
        };
        let resources = vec![
            bundle(),
            v1::Resource {
                key: keys::traffic_policy("shop", "tp"),
                kind: Some(Kind::TrafficPolicy(policy.clone())),
            },
            v1::Resource {
                key: keys::route("shop", "r"),
                kind: Some(Kind::Route(route)),
            },
        ];
        let v = MeshView::default()
            .apply(update(1, true, resources, &[]))
            .unwrap();
        let tp = &v.traffic_policies[&ObjectKey::new("shop", "tp")];
        assert_eq!(tp.connect.map(|c| c.max_attempts), Some(2));
        assert_eq!(v.routes.len(), 1);
        let v = v
            .apply(update(
                2,
                false,
                vec![],
                &["traffic-policy/shop/tp", "route/shop/r"],
            ))
            .unwrap();
        assert!(v.traffic_policies.is_empty() && v.routes.is_empty());
        // A value mesh-cp could not have sent is refused, naming the object.
        let mut bad = policy;
        bad.connect = Some(v1::ConnectSettings {
            timeout_ms: 0,
            max_attempts: 2,
            backoff_ms: 0,
        });
        let err = v
            .apply(update(
                3,
                false,
                vec![v1::Resource {
                    key: keys::traffic_policy("shop", "tp"),
                    kind: Some(Kind::TrafficPolicy(bad)),
                }],
                &[],
            ))
            .unwrap_err();
        assert!(
            err.contains("traffic policy shop/tp: spec.connect.timeout"),
            "{err}"
        );
    }
}
