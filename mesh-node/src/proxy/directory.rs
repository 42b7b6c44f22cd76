//! Where a captured connection goes. Built from the mesh view each time it changes, so a
//! lookup is a hash probe: a workload address goes to that workload, a service VIP and port to
//! its backends (the Service's own endpoints, or a ServiceRoute's backend Services, each with
//! the traffic policies that may apply), anything else leaves the pod unchanged. Which
//! endpoint takes a connection is `proxy/traffic/`'s business.

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
    authz::{PolicyIndex, Source, SourceWorkload},
    traffic::{self, Effective, TrafficPolicy},
    ObjectKey, SpiffeId, Transport,
};

use crate::{
    control::{Lookup, MeshView},
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
    /// On demand: an address this node was not told about either way. Never passed by: the
    /// proxy asks the control plane, and refuses the connection if no answer comes.
    Unresolved,
    Workload(Target),
    /// A service VIP and port: its backends (the Service itself, or a route's).
    Service(Arc<ServicePort>),
}

/// What a service VIP and port lead to: the Service's own endpoints, or the backends of the
/// ServiceRoute that splits it.
#[derive(Debug)]
pub struct ServicePort {
    /// The Service the application asked for, `namespace/name`.
    pub service: String,
    /// The ServiceRoute that splits it, `namespace/name`.
    pub route: Option<String>,
    /// With their weights; backends that do not exist or lack the port are left out.
    pub backends: Vec<(Arc<Backend>, u32)>,
    /// What the Service's port declares it speaks; `None`: relayed as bytes.
    pub protocol: Option<mesh_model::AppProtocol>,
}

impl ServicePort {
    /// A backend for a new connection whose original destination is `like`'s family: by
    /// weight among those with an endpoint in that family (`roll` is a random number);
    /// `None` when none has one.
    pub fn pick(&self, like: IpAddr, roll: u64) -> Option<&Arc<Backend>> {
        let usable = || {
            self.backends
                .iter()
                .filter(move |(b, w)| *w > 0 && b.has_endpoint_like(like))
        };
        let total: u64 = usable().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut at = roll % total;
        for (b, w) in usable() {
            if at < u64::from(*w) {
                return Some(b);
            }
            at -= u64::from(*w);
        }
        None
    }
}

/// A Service port that takes connections: its endpoints, the port they listen on, and the
/// traffic policies that may apply (most specific first; their sources are checked per
/// connection).
#[derive(Debug)]
pub struct Backend {
    pub key: ObjectKey,
    /// `namespace/name`, for labels and logs.
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Arc<Peer>>,
    /// On demand: endpoints the Service lists that this node does not hold yet.
    pub missing: Vec<WorkloadId>,
    pub policies: Vec<Arc<TrafficPolicy>>,
    next: AtomicUsize,
}

impl Backend {
    fn has_endpoint_like(&self, like: IpAddr) -> bool {
        self.endpoints
            .iter()
            .any(|p| p.address_like(like).is_some())
    }

    /// Its endpoints with an address in `like`'s family, as targets.
    pub fn targets(&self, like: IpAddr) -> Vec<Target> {
        self.endpoints
            .iter()
            .filter_map(|peer| {
                peer.address_like(like).map(|ip| Target {
                    peer: peer.clone(),
                    addr: SocketAddr::new(ip, self.target_port),
                })
            })
            .collect()
    }

    /// The next turn of its round-robin.
    pub fn turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The settings for a connection from `src`.
    pub fn settings(&self, src: &Source<'_>) -> Effective {
        traffic::resolve(self.policies.iter().map(|p| &**p), src)
    }

    /// The settings for a connection from the pod `me` to an address of `like`'s family. A
    /// pod not in the view yet has no address a source CIDR could match: it is the unspecified
    /// address then.
    pub fn settings_for(&self, me: Option<&Peer>, like: IpAddr) -> Effective {
        let unknown = if like.is_ipv4() {
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        };
        self.settings(&Source {
            address: me.and_then(|me| me.address_like(like)).unwrap_or(unknown),
            workload: me.map(|me| me.as_source()),
        })
    }
}

/// Rate limits on one workload port: per Service that leads to it, its policies with a
/// `rateLimit`, most specific first.
pub type RateLimited = Vec<Vec<Arc<TrafficPolicy>>>;

/// The directory's Service parts: by VIP and port, and rate limits by workload and port.
type Services = (
    HashMap<SocketAddr, Arc<ServicePort>>,
    HashMap<(WorkloadId, u16), RateLimited>,
);

#[derive(Default)]
pub struct Directory {
    peers: HashMap<WorkloadId, Arc<Peer>>,
    by_addr: HashMap<IpAddr, Arc<Peer>>,
    by_vip: HashMap<SocketAddr, Arc<ServicePort>>,
    /// Rate limits by workload and port (destination side).
    rate_limits: HashMap<(WorkloadId, u16), RateLimited>,
    /// None until a view with a usable trust bundle arrives (always None in offline mode).
    tls: Option<TlsConfigs>,
    /// Policies for this node's workloads; empty in offline mode.
    policies: PolicyIndex,
    /// What tunnels to other nodes use.
    transport: Transport,
    /// Other nodes' workloads come on demand: what is not here is asked for.
    on_demand: bool,
    /// On demand: addresses no workload has, as the control plane answered, and the
    /// Services' VIPs (which are no workload's either).
    absent: std::collections::HashSet<IpAddr>,
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
        let (by_vip, rate_limits) = services(view, &peers, &view.absent_workloads);
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
            rate_limits,
            tls,
            policies,
            transport: view.mesh_policy.transport,
            on_demand: view.on_demand,
            absent: view
                .absent
                .iter()
                .copied()
                .chain(view.services.values().flat_map(|s| {
                    s.vips
                        .iter()
                        .filter_map(|v| mesh_api::ip_from_bytes(v))
                        .map(|ip| ip.to_canonical())
                }))
                .collect(),
        }
    }

    /// What a connection to `dst` needs that this directory lacks, on demand: the address,
    /// when it is neither a workload's, a Service's nor known absent; a Service's endpoints
    /// not held yet. Empty when nothing is wanted (or not on demand).
    pub fn wanted_for(&self, dst: SocketAddr) -> Vec<Lookup> {
        if !self.on_demand {
            return Vec::new();
        }
        if let Some(port) = self.by_vip.get(&dst) {
            return port
                .backends
                .iter()
                .flat_map(|(b, _)| b.missing.iter())
                .map(|k| Lookup::Workload(k.clone()))
                .collect();
        }
        self.wanted_source(dst.ip()).into_iter().collect()
    }

    /// What this directory lacks to know who `ip` is, on demand: the address, when it is
    /// neither a workload's nor known absent.
    pub fn wanted_source(&self, ip: IpAddr) -> Option<Lookup> {
        let canonical = ip.to_canonical();
        let known = self.by_addr.contains_key(&ip)
            || self.by_addr.contains_key(&canonical)
            || self.absent.contains(&canonical);
        (self.on_demand && !known).then_some(Lookup::Address(canonical))
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
        match self.by_vip.get(&dst) {
            Some(port) => Route::Service(port.clone()),
            None if self.wanted_source(dst.ip()).is_some() => Route::Unresolved,
            None => Route::Passthrough,
        }
    }

    /// The rate limits that protect `port` of `workload`, if any.
    pub fn rate_limits(&self, workload: &WorkloadId, port: u16) -> Option<&RateLimited> {
        self.rate_limits.get(&(workload.clone(), port))
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

/// Every service VIP and port with what it leads to, and the rate limits of each workload port
/// that a Service leads to.
fn services(
    view: &MeshView,
    peers: &HashMap<WorkloadId, Arc<Peer>>,
    absent: &std::collections::BTreeSet<WorkloadId>,
) -> Services {
    let root = &view.mesh_policy.root_namespace;
    let policies = |key: &ObjectKey, port: u16| -> Vec<Arc<TrafficPolicy>> {
        traffic::candidates(
            view.traffic_policies.values().map(|p| &**p),
            root,
            key,
            port,
        )
        .into_iter()
        .filter_map(|p| view.traffic_policies.get(&p.key).cloned())
        .collect()
    };
    // One per Service port, shared by every VIP and route that leads to it.
    let mut backends: HashMap<(ObjectKey, u16), Arc<Backend>> = HashMap::new();
    let mut backend = |key: &ObjectKey, port: u16| -> Option<Arc<Backend>> {
        if let Some(b) = backends.get(&(key.clone(), port)) {
            return Some(b.clone());
        }
        let s = view.services.get(key)?;
        let p = s.ports.iter().find(|p| p.port == u32::from(port))?;
        let target_port = u16::try_from(p.target_port).ok()?;
        let b = Arc::new(Backend {
            key: key.clone(),
            name: key.to_string(),
            port,
            target_port,
            endpoints: endpoints(s, peers),
            missing: match view.on_demand {
                true => missing(s, peers, absent),
                false => Vec::new(),
            },
            policies: policies(key, port),
            next: AtomicUsize::new(0),
        });
        backends.insert((key.clone(), port), b.clone());
        Some(b)
    };
    let mut by_vip = HashMap::new();
    let mut rate_limits: HashMap<(WorkloadId, u16), RateLimited> = HashMap::new();
    for (key, s) in &view.services {
        for p in &s.ports {
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let Some(own) = backend(key, port) else {
                continue;
            };
            let limited: Vec<Arc<TrafficPolicy>> = own
                .policies
                .iter()
                .filter(|p| p.rate_limit.is_some())
                .cloned()
                .collect();
            if !limited.is_empty() {
                // A Service's policies protect only pods of its own namespace (mesh-cp puts no
                // other behind it; this holds even if an older one did).
                for peer in own
                    .endpoints
                    .iter()
                    .filter(|p| p.key.namespace == key.namespace)
                {
                    rate_limits
                        .entry((peer.key.clone(), own.target_port))
                        .or_default()
                        .push(limited.clone());
                }
            }
            let route = traffic::route_for(view.routes.values(), key, port);
            let split = match route {
                None => vec![(own, 1)],
                Some(r) => r
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let found = backend(&r.backend_key(b), b.port_for(port));
                        if found.is_none() {
                            tracing::debug!(route = %r.key, backend = %b.service, port = b.port_for(port), "a route's backend is not a Service with that port; its share goes to the others");
                        }
                        found.map(|found| (found, b.weight))
                    })
                    .collect(),
            };
            let entry = Arc::new(ServicePort {
                service: key.to_string(),
                route: route.map(|r| r.key.to_string()),
                backends: split,
                protocol: p.protocol(),
            });
            for vip in s.vips.iter().filter_map(|v| mesh_api::ip_from_bytes(v)) {
                by_vip.insert(SocketAddr::new(vip, port), entry.clone());
            }
        }
    }
    (by_vip, rate_limits)
}

/// The service's endpoints that the view neither holds nor knows not to exist.
fn missing(
    service: &v1::Service,
    peers: &HashMap<WorkloadId, Arc<Peer>>,
    absent: &std::collections::BTreeSet<WorkloadId>,
) -> Vec<WorkloadId> {
    service
        .endpoints
        .iter()
        .filter_map(|key| mesh_api::keys::object_key(key))
        .filter(|k| !peers.contains_key(k) && !absent.contains(k))
        .collect()
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
                    ..Default::default()
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
    fn on_demand_an_unknown_address_is_asked_for_never_passed_by() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut v = view();
        v.on_demand = true;
        v.workloads.remove(&WorkloadId::new("default", "c"));
        v.absent.insert(ip("10.0.0.8"));
        v.absent_workloads
            .insert(WorkloadId::new("default", "gone"));
        let dir = Directory::new(&v, Arc::default());
        assert!(matches!(
            dir.route(addr("10.0.0.9:9000")),
            Route::Unresolved
        ));
        assert_eq!(
            dir.wanted_for(addr("10.0.0.9:9000")),
            [Lookup::Address(ip("10.0.0.9"))]
        );
        // Known absent: outside the mesh.
        assert!(matches!(
            dir.route(addr("10.0.0.8:9000")),
            Route::Passthrough
        ));
        assert!(dir.wanted_for(addr("10.0.0.8:9000")).is_empty());
        // A Service's endpoint not held is asked for by key; one that does not exist is not.
        assert_eq!(
            dir.wanted_for(addr("10.96.0.1:80")),
            [Lookup::Workload(WorkloadId::new("default", "c"))]
        );
        // A VIP on a port the Service does not expose is no workload's: passed by.
        assert!(matches!(
            dir.route(addr("10.96.0.1:81")),
            Route::Passthrough
        ));
        // Sources: a held workload is known; an IPv4-mapped address is asked for as IPv4.
        assert!(dir.wanted_source(ip("10.0.0.2")).is_none());
        assert_eq!(
            dir.wanted_source(ip("::ffff:10.0.0.7")),
            Some(Lookup::Address(ip("10.0.0.7")))
        );
        // Not on demand: nothing is asked, and what is unknown is outside the mesh.
        let full = Directory::new(&view(), Arc::default());
        assert!(full.wanted_for(addr("10.0.0.9:9000")).is_empty());
        assert!(matches!(
            full.route(addr("10.0.0.9:9000")),
            Route::Passthrough
        ));
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
        let Route::Service(port) = dir.route(addr("10.96.0.1:80")) else {
            panic!("not the service")
        };
        assert_eq!(port.service, "default/web");
        assert_eq!(port.route, None);
        let backend = port.pick(addr("10.96.0.1:80").ip(), 7).unwrap();
        // The endpoint that is not in the view is skipped.
        let targets: Vec<_> = backend.targets(addr("10.96.0.1:80").ip());
        assert_eq!(
            targets.iter().map(|t| t.addr).collect::<Vec<_>>(),
            [addr("10.0.0.2:8080"), addr("10.0.0.3:8080")]
        );
        assert_eq!((backend.turn(), backend.turn()), (0, 1));
    }

    #[test]
    fn routes_split_by_weight_over_backends_that_exist() {
        let mut view = view();
        let mut v2 = view.services[&WorkloadId::new("default", "web")].clone();
        v2.name = "web-v2".into();
        v2.vips = vec![vec![10, 96, 0, 2]];
        v2.endpoints = vec!["default/c".into()];
        view.services
            .insert(WorkloadId::new("default", "web-v2"), v2);
        let route = |backends: &[(&str, u32)]| mesh_model::traffic::ServiceRoute {
            key: WorkloadId::new("default", "canary"),
            service: "web".into(),
            port: None,
            backends: backends
                .iter()
                .map(|(s, w)| mesh_model::traffic::Backend {
                    service: s.to_string(),
                    port: None,
                    weight: *w,
                })
                .collect(),
        };
        view.routes.insert(
            WorkloadId::new("default", "canary"),
            route(&[("web", 90), ("web-v2", 10), ("missing", 50)]),
        );
        let dir = Directory::new(&view, Arc::default());
        let Route::Service(port) = dir.route(addr("10.96.0.1:80")) else {
            panic!("not the service")
        };
        assert_eq!(port.route.as_deref(), Some("default/canary"));
        // The missing backend is left out: its share goes to the others.
        assert_eq!(port.backends.len(), 2);
        let ip = addr("10.96.0.1:80").ip();
        let picks: Vec<String> = (0..100u64)
            .map(|roll| port.pick(ip, roll).unwrap().name.clone())
            .collect();
        assert_eq!(picks.iter().filter(|n| *n == "default/web-v2").count(), 10);
        // A backend with no endpoint in the family takes nothing.
        assert!(port.pick("fd00::1".parse().unwrap(), 0).is_some());
        view.routes.insert(
            WorkloadId::new("default", "canary"),
            route(&[("web", 0), ("web-v2", 100)]),
        );
        let dir = Directory::new(&view, Arc::default());
        let Route::Service(port) = dir.route(addr("10.96.0.1:80")) else {
            panic!("not the service")
        };
        assert!((0..50u64).all(|roll| port.pick(ip, roll).unwrap().name == "default/web-v2"));
    }

    #[test]
    fn offline_view_has_no_tls_and_routes_nothing() {
        let dir = Directory::new(&MeshView::default(), Arc::default());
        assert!(dir.tls().is_none());
        assert!(matches!(dir.route(addr("10.0.0.2:80")), Route::Passthrough));
    }
}
