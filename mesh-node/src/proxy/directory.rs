//! Where a captured connection goes. Built from the mesh view each time it changes, so a
//! lookup is a hash probe: a workload address goes to that workload, a service VIP and port to
//! one of its endpoints (round-robin), anything else leaves the pod unchanged.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use mesh_api::v1;
use mesh_model::{
    authz::{PolicyIndex, SourceWorkload},
    SpiffeId, Transport,
};

use crate::{
    control::MeshView,
    identity::SvidStore,
    tunnel::{TlsConfigs, Trust},
    workloads::WorkloadId,
};

/// A mesh workload as the proxy needs it.
#[derive(Debug)]
pub struct Peer {
    pub key: WorkloadId,
    pub identity: SpiffeId,
    /// `identity` as a URI, which is what policies match.
    pub identity_uri: String,
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The node it is placed on.
    pub node: String,
}

impl Peer {
    /// This workload as a policy client, once its identity has been verified.
    pub fn as_source(&self) -> SourceWorkload<'_> {
        SourceWorkload {
            identity: &self.identity_uri,
            namespace: &self.identity.namespace,
            labels: &self.labels,
        }
    }

    /// The workload's first address in the family of `like`.
    pub fn address_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
    }
}

/// A destination in the mesh: the workload and the exact address and port to reach it on.
#[derive(Debug, Clone)]
pub struct Target {
    pub peer: Arc<Peer>,
    pub addr: SocketAddr,
}

#[derive(Debug)]
pub enum Route {
    /// Not a mesh destination: connect to it as the application asked.
    Passthrough,
    Workload(Target),
    /// A service VIP: endpoints in the order to try them.
    Service {
        service: String,
        candidates: Vec<Target>,
    },
}

struct ServiceEntry {
    name: String,
    target_port: u16,
    endpoints: Vec<Arc<Peer>>,
    next: AtomicUsize,
}

#[derive(Default)]
pub struct Directory {
    peers: HashMap<WorkloadId, Arc<Peer>>,
    by_addr: HashMap<IpAddr, Arc<Peer>>,
    by_vip: HashMap<SocketAddr, ServiceEntry>,
    /// None until a view with a usable trust bundle arrives (always None in offline mode).
    tls: Option<TlsConfigs>,
    /// Policies for this node's workloads; empty in offline mode.
    policies: PolicyIndex,
    /// What tunnels to other nodes use.
    transport: Transport,
}

impl Directory {
    pub fn new(view: &MeshView, svids: Arc<SvidStore>) -> Self {
        let mut peers = HashMap::new();
        let mut by_addr = HashMap::new();
        for (key, w) in &view.workloads {
            let identity = match w.identity.parse::<SpiffeId>() {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(workload = %key, error = %e, "workload has an unusable identity; not routable");
                    continue;
                }
            };
            let peer = Arc::new(Peer {
                key: key.clone(),
                identity_uri: identity.to_string(),
                identity,
                labels: w.labels.clone().into_iter().collect(),
                addresses: w
                    .addresses
                    .iter()
                    .filter_map(|a| mesh_api::ip_from_bytes(a))
                    .collect(),
                node: w.node.clone(),
            });
            for a in &peer.addresses {
                by_addr.insert(*a, peer.clone());
            }
            peers.insert(key.clone(), peer);
        }
        let mut by_vip = HashMap::new();
        for (key, s) in &view.services {
            for vip in s.vips.iter().filter_map(|v| mesh_api::ip_from_bytes(v)) {
                for p in &s.ports {
                    let (Ok(port), Ok(target_port)) =
                        (u16::try_from(p.port), u16::try_from(p.target_port))
                    else {
                        continue;
                    };
                    by_vip.insert(
                        SocketAddr::new(vip, port),
                        ServiceEntry {
                            name: key.to_string(),
                            target_port,
                            endpoints: endpoints(s, &peers),
                            next: AtomicUsize::new(0),
                        },
                    );
                }
            }
        }
        let tls = if view.trust_roots.is_empty() {
            None
        } else {
            match Trust::new(&view.trust_roots, &view.mesh.trust_domain) {
                Ok(trust) => Some(TlsConfigs::new(trust, svids)),
                Err(e) => {
                    tracing::error!(error = %e, "the trust bundle is unusable; no tunnel can be made");
                    None
                }
            }
        };
        let policies = PolicyIndex::new(
            view.mesh_policy.default_action,
            view.policies.values().cloned(),
        );
        Self {
            peers,
            by_addr,
            by_vip,
            tls,
            policies,
            transport: view.mesh_policy.transport,
        }
    }

    /// Whether [`Directory::route`] would send `dst` to the mesh (a workload or a service),
    /// without taking a turn of a service's round-robin.
    pub fn is_mesh_destination(&self, dst: SocketAddr) -> bool {
        self.by_addr.contains_key(&dst.ip()) || self.by_vip.contains_key(&dst)
    }

    pub fn route(&self, dst: SocketAddr) -> Route {
        if let Some(peer) = self.by_addr.get(&dst.ip()) {
            return Route::Workload(Target {
                peer: peer.clone(),
                addr: dst,
            });
        }
        let Some(svc) = self.by_vip.get(&dst) else {
            return Route::Passthrough;
        };
        // Endpoints with an address in the family the application used, starting at the next
        // one in turn.
        let reachable: Vec<Target> = svc
            .endpoints
            .iter()
            .filter_map(|peer| {
                peer.address_like(dst.ip()).map(|ip| Target {
                    peer: peer.clone(),
                    addr: SocketAddr::new(ip, svc.target_port),
                })
            })
            .collect();
        let mut candidates = reachable;
        if !candidates.is_empty() {
            let start = svc.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
            candidates.rotate_left(start);
        }
        Route::Service {
            service: svc.name.clone(),
            candidates,
        }
    }

    pub fn peer(&self, key: &WorkloadId) -> Option<&Arc<Peer>> {
        self.peers.get(key)
    }

    pub fn peer_by_addr(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.by_addr.get(&ip)
    }

    pub fn tls(&self) -> Option<&TlsConfigs> {
        self.tls.as_ref()
    }

    pub fn policies(&self) -> &PolicyIndex {
        &self.policies
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }
}

/// The service's endpoints (`namespace/name` keys on the wire) that the view knows.
fn endpoints(service: &v1::Service, peers: &HashMap<WorkloadId, Arc<Peer>>) -> Vec<Arc<Peer>> {
    service
        .endpoints
        .iter()
        .filter_map(|key| peers.get(&mesh_api::keys::object_key(key)?).cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> MeshView {
        let workload = |name: &str, node: &str, last: u8| v1::Workload {
            namespace: "default".into(),
            name: name.into(),
            node: node.into(),
            netns: String::new(),
            addresses: vec![vec![10, 0, 0, last], {
                let mut v6 = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                v6.push(last);
                v6
            }],
            identity: format!("spiffe://cluster.local/ns/default/sa/{name}"),
            labels: Default::default(),
        };
        let mut view = MeshView::default();
        for (name, node, last) in [("a", "n1", 1), ("b", "n2", 2), ("c", "n2", 3)] {
            view.workloads
                .insert(WorkloadId::new("default", name), workload(name, node, last));
        }
        view.services.insert(
            WorkloadId::new("default", "web"),
            v1::Service {
                namespace: "default".into(),
                name: "web".into(),
                vips: vec![vec![10, 96, 0, 1]],
                ports: vec![v1::ServicePort {
                    port: 80,
                    target_port: 8080,
                    name: "http".into(),
                }],
                endpoints: vec![
                    "default/b".into(),
                    "default/c".into(),
                    "default/gone".into(),
                ],
            },
        );
        view
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn routes_workloads_services_and_everything_else() {
        let dir = Directory::new(&view(), Arc::default());
        match dir.route(addr("10.0.0.2:9000")) {
            Route::Workload(t) => {
                assert_eq!(t.peer.key, WorkloadId::new("default", "b"));
                assert_eq!(t.addr, addr("10.0.0.2:9000"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            dir.route(addr("10.0.0.9:9000")),
            Route::Passthrough
        ));
        // A VIP on a port the service does not expose is not the service.
        assert!(matches!(
            dir.route(addr("10.96.0.1:81")),
            Route::Passthrough
        ));
        // The mesh-destination check agrees with the routes and takes no round-robin turn.
        assert!(dir.is_mesh_destination(addr("10.0.0.2:9000")));
        assert!(dir.is_mesh_destination(addr("10.96.0.1:80")));
        assert!(!dir.is_mesh_destination(addr("10.96.0.1:81")));
        assert!(!dir.is_mesh_destination(addr("10.0.0.9:9000")));
        let mut firsts = Vec::new();
        for _ in 0..4 {
            assert!(dir.is_mesh_destination(addr("10.96.0.1:80")));
            match dir.route(addr("10.96.0.1:80")) {
                Route::Service {
                    service,
                    candidates,
                } => {
                    assert_eq!(service, "default/web");
                    // The endpoint that is not in the view is skipped.
                    assert_eq!(candidates.len(), 2);
                    assert!(candidates.iter().all(|t| t.addr.port() == 8080));
                    firsts.push(candidates[0].addr);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            firsts,
            [
                addr("10.0.0.2:8080"),
                addr("10.0.0.3:8080"),
                addr("10.0.0.2:8080"),
                addr("10.0.0.3:8080")
            ]
        );
    }

    #[test]
    fn offline_view_has_no_tls_and_routes_nothing() {
        let dir = Directory::new(&MeshView::default(), Arc::default());
        assert!(dir.tls().is_none());
        assert!(matches!(dir.route(addr("10.0.0.2:80")), Route::Passthrough));
    }
}
