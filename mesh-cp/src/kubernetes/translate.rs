//! Kubernetes objects into the model universal mode uses. Everything behind this (slices for
//! nodes, fast-deny sets, certificates, explain) is the same code for both sources.
//!
//! - A pod is a [`Workload`] when it is in the mesh: its own `mycel.dev/mesh` label says
//!   `enabled` (or `disabled`), else its namespace's does. Only pods with a node and an
//!   address, not on the host's network and not finished, can be captured. A mirror pod
//!   (static pod) or a pod without a service account is left out, with the reason:
//!   `mesh_model::membership::no_identity`.
//! - A Service is a mesh [`Service`] when its ready endpoints (from its EndpointSlices) include
//!   pods of the mesh; traffic from the mesh goes to those pods only. Headless services need
//!   nothing: their clients connect to pod addresses.
//! - AccessPolicies, TrafficPolicies, ServiceRoutes and the MeshConfig are read by the
//!   universal mode's own parser. Unlike a config dir, where one bad file rejects the set, one
//!   bad object here is left out and says why in its status: the others, and the cluster's
//!   pods, do not wait for it. Of two ServiceRoutes for one Service port, the first by
//!   `namespace/name` is kept, as a config dir keeps the first it reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service as KubeService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{api::DynamicObject, ResourceExt};
use mesh_model::{
    policy::AccessPolicy,
    traffic::{ServiceRoute, TrafficPolicy},
    AppProtocol, Config, MeshConfig, ObjectKey, Resource, Service, ServicePort, Workload,
};

pub use mesh_model::membership::MESH_LABEL;
/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the adapter watches, as the reflectors hold it.
#[derive(Clone, Default)]
pub struct Objects {
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<KubeService>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub policies: Vec<Arc<DynamicObject>>,
    pub meshes: Vec<Arc<DynamicObject>>,
    pub traffic_policies: Vec<Arc<DynamicObject>>,
    pub routes: Vec<Arc<DynamicObject>>,
}

/// What became of one AccessPolicy, TrafficPolicy or ServiceRoute, for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// In force, applying to this.
    Accepted(Applies),
    /// Left out, with the parser's one-line reason.
    Invalid { reason: String },
}

/// What an object in force applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applies {
    /// An AccessPolicy: the number of workloads it selects.
    Workloads(usize),
    /// A TrafficPolicy or ServiceRoute: the Services it binds, in key order.
    Services(Vec<ObjectKey>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The `metadata.generation` this verdict is about.
    pub generation: Option<i64>,
    pub verdict: Verdict,
}

pub type Outcomes = BTreeMap<ObjectKey, Outcome>;

#[derive(Clone)]
pub struct Translated {
    pub config: Config,
    pub policies: Outcomes,
    pub traffic_policies: Outcomes,
    pub routes: Outcomes,
    /// What was left out and why, one line each, for the log and `/status`.
    pub problems: Vec<String>,
}

/// The model of `objects`. `previous` is the mesh settings in force, kept when the MeshConfig
/// cannot be read: flipping the trust domain or the default action on a typo would cut the
/// mesh.
pub fn translate(objects: &Objects, previous: &MeshConfig) -> Translated {
    let mut problems = Vec::new();
    let mesh = mesh_config(&objects.meshes, previous, &mut problems);
    let mut config = Config {
        mesh,
        ..Config::default()
    };
    let namespaces: BTreeMap<String, &Namespace> = objects
        .namespaces
        .iter()
        .map(|n| (n.name_any(), n.as_ref()))
        .collect();
    let mut claimed: BTreeMap<IpAddr, ObjectKey> = BTreeMap::new();
    for pod in &objects.pods {
        if let Some(reason) = refused(pod, &namespaces) {
            problems.push(format!(
                "pod {}/{} left out: {reason}",
                pod.namespace().unwrap_or_default(),
                pod.name_any()
            ));
            continue;
        }
        let Some(workload) = workload(pod, &namespaces) else {
            continue;
        };
        if let Some((ip, other)) = workload
            .addresses
            .iter()
            .find_map(|ip| claimed.get(ip).map(|o| (ip, o)))
        {
            problems.push(format!(
                "pod {} left out: its address {ip} is also pod {other}'s",
                workload.key
            ));
            continue;
        }
        for ip in &workload.addresses {
            claimed.insert(*ip, workload.key.clone());
        }
        config.workloads.insert(workload.key.clone(), workload);
    }
    // A Service that a route splits is kept without endpoints of its own: its clients are then
    // sent to the route's backends (a cut-over to v2 with v1 scaled to zero), not around the mesh.
    let routed: BTreeSet<ObjectKey> = objects
        .routes
        .iter()
        .filter_map(|r| {
            let service = r.data["spec"]["service"].as_str()?;
            Some(ObjectKey::new(&r.namespace()?, service))
        })
        .collect();
    for svc in &objects.services {
        if let Some(s) = service(svc, &objects.slices, &config, &routed, &mut problems) {
            config.services.insert(s.key.clone(), s);
        }
    }
    let (mut policies, mut traffic_policies, mut routes) =
        (Outcomes::new(), Outcomes::new(), Outcomes::new());
    let mut accepted = Accepted::default();
    for (kind, list, outcomes) in [
        ("AccessPolicy", &objects.policies, &mut policies),
        (
            "TrafficPolicy",
            &objects.traffic_policies,
            &mut traffic_policies,
        ),
        ("ServiceRoute", &objects.routes, &mut routes),
    ] {
        parse_each(kind, list, &mut accepted, outcomes, &mut problems);
    }
    // Counted once every workload is in: what a policy selects depends on all of them.
    for (p, generation) in accepted.policies {
        let selected = Applies::Workloads(config.selected_by(&p).count());
        accept(&mut policies, &p.key, generation, selected);
        config.policies.insert(p.key.clone(), p);
    }
    let root = config.mesh.root_namespace.clone();
    for (p, generation) in accepted.traffic_policies {
        let binds = config.services.keys().filter(|s| p.binds(&root, s));
        let binds = Applies::Services(binds.cloned().collect());
        accept(&mut traffic_policies, &p.key, generation, binds);
        config.traffic_policies.insert(p.key.clone(), p);
    }
    // The reflector's order is no order at all: which of two clashing routes wins must not
    // change from one list to the next.
    accepted.routes.sort_by(|(a, _), (b, _)| a.key.cmp(&b.key));
    for (r, generation) in accepted.routes {
        if let Some(reason) = config.route_clash(&r) {
            left_out(
                "ServiceRoute",
                r.key,
                generation,
                reason,
                &mut routes,
                &mut problems,
            );
            continue;
        }
        // Only mesh Services: a route moves no connection to or from any other.
        let binds: BTreeSet<ObjectKey> = std::iter::once(r.routed())
            .chain(r.backends.iter().map(|b| r.backend_key(b)))
            .filter(|s| config.services.contains_key(s))
            .collect();
        let binds = Applies::Services(binds.into_iter().collect());
        accept(&mut routes, &r.key, generation, binds);
        config.routes.insert(r.key.clone(), r);
    }
    Translated {
        config,
        policies,
        traffic_policies,
        routes,
        problems,
    }
}

/// What the model accepted, by kind, with each object's generation.
#[derive(Default)]
struct Accepted {
    policies: Vec<(AccessPolicy, Option<i64>)>,
    traffic_policies: Vec<(TrafficPolicy, Option<i64>)>,
    routes: Vec<(ServiceRoute, Option<i64>)>,
}

/// Reads each object of one kind: what the model accepts goes to `accepted`, what it refuses
/// is left out with its reason.
fn parse_each(
    kind: &str,
    objects: &[Arc<DynamicObject>],
    accepted: &mut Accepted,
    outcomes: &mut Outcomes,
    problems: &mut Vec<String>,
) {
    for obj in objects {
        let key = ObjectKey::new(&obj.namespace().unwrap_or_default(), &obj.name_any());
        let generation = obj.metadata.generation;
        match mesh_model::parse_document(document(obj)) {
            Ok(Resource::AccessPolicy(p)) => accepted.policies.push((p, generation)),
            Ok(Resource::TrafficPolicy(p)) => accepted.traffic_policies.push((p, generation)),
            Ok(Resource::ServiceRoute(r)) => accepted.routes.push((r, generation)),
            // The document's kind is the watched resource's, none of these.
            Ok(Resource::MeshConfig(_) | Resource::Workload(_) | Resource::Service(_)) => {}
            Err(reason) => left_out(kind, key, generation, reason, outcomes, problems),
        }
    }
}

fn left_out(
    kind: &str,
    key: ObjectKey,
    generation: Option<i64>,
    reason: String,
    outcomes: &mut Outcomes,
    problems: &mut Vec<String>,
) {
    problems.push(format!("{kind} {key} left out: {reason}"));
    let verdict = Verdict::Invalid { reason };
    outcomes.insert(
        key,
        Outcome {
            generation,
            verdict,
        },
    );
}

fn accept(outcomes: &mut Outcomes, key: &ObjectKey, generation: Option<i64>, applies: Applies) {
    let verdict = Verdict::Accepted(applies);
    outcomes.insert(
        key.clone(),
        Outcome {
            generation,
            verdict,
        },
    );
}

/// The one MeshConfig, defaults without one, `previous` when it cannot be read.
fn mesh_config(
    meshes: &[Arc<DynamicObject>],
    previous: &MeshConfig,
    problems: &mut Vec<String>,
) -> MeshConfig {
    match meshes {
        [] => MeshConfig::default(),
        [one] => match mesh_model::parse_document(document(one)) {
            Ok(Resource::MeshConfig(m)) => m,
            Ok(_) => previous.clone(),
            Err(e) => {
                problems.push(format!(
                    "MeshConfig {} refused, the settings in force stay: {e}",
                    one.name_any()
                ));
                previous.clone()
            }
        },
        many => {
            let names: Vec<_> = many.iter().map(|m| m.name_any()).collect();
            problems.push(format!(
                "{} MeshConfigs ({}); there can be only one: the settings in force stay",
                many.len(),
                names.join(", ")
            ));
            previous.clone()
        }
    }
}

/// A custom resource as the YAML document universal mode would read.
fn document(obj: &DynamicObject) -> serde_yaml::Value {
    let types = obj.types.clone().unwrap_or_default();
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), obj.name_any().into());
    if let Some(ns) = obj.namespace() {
        metadata.insert("namespace".into(), ns.into());
    }
    let doc = serde_json::json!({
        "apiVersion": types.api_version,
        "kind": types.kind,
        "metadata": metadata,
        "spec": obj.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    });
    serde_yaml::to_value(doc).unwrap_or(serde_yaml::Value::Null)
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// Whether `pod` asks to be in the mesh, by its own label or its namespace's.
fn in_mesh(pod: &Pod, namespaces: &BTreeMap<String, &Namespace>) -> bool {
    let namespace = pod.namespace().and_then(|ns| namespaces.get(&ns).copied());
    mesh_model::membership::in_mesh(
        label(&pod.metadata.labels, MESH_LABEL),
        namespace.and_then(|ns| label(&ns.metadata.labels, MESH_LABEL)),
    )
}

/// Why a pod that asks for the mesh can have no identity, if it cannot.
fn refused(pod: &Pod, namespaces: &BTreeMap<String, &Namespace>) -> Option<&'static str> {
    if !in_mesh(pod, namespaces) {
        return None;
    }
    mesh_model::membership::no_identity(
        pod.metadata.annotations.as_ref(),
        pod.spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref()),
    )
}

/// The workload of a pod in the mesh that a node can capture now.
fn workload(pod: &Pod, namespaces: &BTreeMap<String, &Namespace>) -> Option<Workload> {
    if !in_mesh(pod, namespaces) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if addresses.is_empty() {
        return None;
    }
    Some(Workload {
        key: ObjectKey::new(&pod.namespace()?, &pod.name_any()),
        labels: pod.labels().clone(),
        node,
        // The node finds the pod's network namespace itself (the CNI plugin hands it over).
        netns: PathBuf::new(),
        addresses,
        service_account: spec.service_account_name.clone()?,
    })
}

/// The mesh service of `svc`, if it has a virtual IP and ready endpoints in the mesh.
fn service(
    svc: &KubeService,
    slices: &[Arc<EndpointSlice>],
    config: &Config,
    routed: &BTreeSet<ObjectKey>,
    problems: &mut Vec<String>,
) -> Option<Service> {
    let namespace = svc.namespace()?;
    let name = svc.name_any();
    let spec = svc.spec.as_ref()?;
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if vips.is_empty() {
        return None;
    }
    let own: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace.as_str())
                && label(&s.metadata.labels, SERVICE_NAME_LABEL) == Some(name.as_str())
        })
        .map(|s| s.as_ref())
        .collect();
    let endpoints: BTreeSet<ObjectKey> = own
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .filter_map(|r| {
            let key = ObjectKey::new(
                r.namespace.as_deref().unwrap_or(&namespace),
                r.name.as_deref()?,
            );
            // An EndpointSlice is written by whoever may write the Service's namespace; a pod
            // of another namespace is not theirs to put behind it (its traffic policies and
            // rate limits would then reach that pod).
            if key.namespace != namespace {
                problems.push(format!(
                    "service {namespace}/{name}: endpoint {key} left out: a Service's endpoints must be pods of its own namespace"
                ));
                return None;
            }
            config.workloads.contains_key(&key).then_some(key)
        })
        .collect();
    if endpoints.is_empty() && !routed.contains(&ObjectKey::new(&namespace, &name)) {
        return None;
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let target = match &p.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            // A named port: what the EndpointSlices resolved it to.
            Some(IntOrString::String(_)) => own
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|sp| sp.name == p.name)
                .and_then(|sp| sp.port)
                .and_then(|n| u16::try_from(n).ok()),
        };
        match target {
            Some(target_port) => ports.push(ServicePort {
                name: p.name.clone(),
                port,
                target_port,
                // Values the mesh does not speak (`https`, `kubernetes.io/ws`, …) are common
                // and not mistakes: such a port is relayed as bytes.
                app_protocol: p.app_protocol.as_deref().and_then(AppProtocol::parse),
            }),
            None => problems.push(format!(
                "service {namespace}/{name} port {port} left out: its target port is not resolved yet"
            )),
        }
    }
    if ports.is_empty() {
        return None;
    }
    Some(Service {
        key: ObjectKey::new(&namespace, &name),
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        endpoints: Some(endpoints),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ApiResource;
    use mesh_model::crd::{
        AccessPolicy as AccessPolicyCrd, ServiceRoute as ServiceRouteCrd,
        TrafficPolicy as TrafficPolicyCrd,
    };
    use serde_json::json;

    pub(crate) fn pod(
        ns: &str,
        name: &str,
        node: &str,
        ip: &str,
        labels: serde_json::Value,
    ) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": { "name": name, "namespace": ns, "labels": labels },
                "spec": { "nodeName": node, "serviceAccountName": name, "containers": [] },
                "status": { "phase": "Running", "podIPs": [{ "ip": ip }] }
            }))
            .unwrap(),
        )
    }

    fn namespace(name: &str, mesh: Option<&str>) -> Arc<Namespace> {
        let labels = mesh.map_or(json!({}), |m| json!({ MESH_LABEL: m }));
        Arc::new(
            serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } }))
                .unwrap(),
        )
    }

    /// An object of a namespaced kind of Mycel's, at generation 3.
    fn custom(
        ar: &ApiResource,
        ns: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> Arc<DynamicObject> {
        let mut obj = DynamicObject::new(name, ar)
            .within(ns)
            .data(json!({ "spec": spec }));
        obj.metadata.generation = Some(3);
        Arc::new(obj)
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        custom(&ApiResource::erase::<AccessPolicyCrd>(&()), ns, name, spec)
    }

    fn keys(c: &Config) -> Vec<String> {
        c.workloads.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn pods_join_by_namespace_or_their_own_label() {
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled")), namespace("ops", None)],
            pods: vec![
                pod(
                    "shop",
                    "order-1",
                    "n1",
                    "10.1.0.2",
                    json!({ "app": "order" }),
                ),
                pod(
                    "shop",
                    "legacy",
                    "n1",
                    "10.1.0.3",
                    json!({ MESH_LABEL: "disabled" }),
                ),
                pod("ops", "tool", "n2", "10.1.0.4", json!({})),
                pod(
                    "ops",
                    "agent",
                    "n2",
                    "10.1.0.5",
                    json!({ MESH_LABEL: "enabled" }),
                ),
            ],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        assert_eq!(keys(&t.config), ["ops/agent", "shop/order-1"]);
        let order = &t.config.workloads[&ObjectKey::new("shop", "order-1")];
        assert_eq!(order.node, "n1");
        assert_eq!(order.service_account, "order-1");
        assert_eq!(order.addresses, ["10.1.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(order.labels["app"], "order");
    }

    /// Regression (issue 19): a mirror (static) pod in a meshed namespace was given the
    /// identity of whatever service account its manifest named, and a pod without one the
    /// namespace's `default`.
    #[test]
    fn pods_without_a_trustworthy_identity_are_left_out_with_the_reason() {
        let mut mirror = (*pod("shop", "static", "n1", "10.1.0.2", json!({}))).clone();
        mirror.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_owned(), "x".to_owned())].into());
        let mut nameless = (*pod("shop", "anon", "n1", "10.1.0.3", json!({}))).clone();
        nameless.spec.as_mut().unwrap().service_account_name = None;
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled"))],
            pods: vec![
                Arc::new(mirror),
                Arc::new(nameless),
                pod("shop", "web", "n1", "10.1.0.4", json!({})),
            ],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        assert_eq!(keys(&t.config), ["shop/web"]);
        assert!(
            t.problems
                .iter()
                .any(|p| p.starts_with("pod shop/static left out: it mirrors a static pod")),
            "{:?}",
            t.problems
        );
        assert!(
            t.problems
                .iter()
                .any(|p| p.starts_with("pod shop/anon left out: it names no service account")),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn pods_that_cannot_be_captured_are_left_out() {
        let mut host = (*pod("shop", "host", "n1", "10.0.0.1", json!({}))).clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = (*pod("shop", "done", "n1", "10.1.0.9", json!({}))).clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut unscheduled = (*pod("shop", "pending", "", "10.1.0.8", json!({}))).clone();
        unscheduled.spec.as_mut().unwrap().node_name = None;
        let mut no_ip = (*pod("shop", "starting", "n1", "10.1.0.7", json!({}))).clone();
        no_ip.status.as_mut().unwrap().pod_ips = None;
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled"))],
            pods: [host, done, unscheduled, no_ip]
                .into_iter()
                .map(Arc::new)
                .collect(),
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        assert!(t.config.workloads.is_empty(), "{:?}", keys(&t.config));
        // A clash of addresses leaves the second pod out and says so.
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled"))],
            pods: vec![
                pod("shop", "a", "n1", "10.1.0.2", json!({})),
                pod("shop", "b", "n1", "10.1.0.2", json!({})),
            ],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        assert_eq!(keys(&t.config), ["shop/a"]);
        assert!(t.problems[0].contains("shop/b"), "{:?}", t.problems);
    }

    fn service_and_slice(ready: &[(&str, bool)]) -> (Arc<KubeService>, Arc<EndpointSlice>) {
        let svc = serde_json::from_value(json!({
            "metadata": { "name": "payment", "namespace": "shop" },
            "spec": {
                "clusterIPs": ["10.96.0.10"],
                "selector": { "app": "payment" },
                "ports": [
                    { "name": "http", "port": 80, "targetPort": "http", "appProtocol": "http" },
                    { "name": "admin", "port": 9000, "targetPort": 9001, "appProtocol": "https" },
                    { "name": "dns", "port": 53, "protocol": "UDP" }
                ]
            }
        }))
        .unwrap();
        let endpoints: Vec<_> = ready
            .iter()
            .map(|(pod, ready)| {
                json!({
                    "addresses": ["10.1.0.9"],
                    "conditions": { "ready": ready },
                    "targetRef": { "kind": "Pod", "namespace": "shop", "name": pod }
                })
            })
            .collect();
        let slice = serde_json::from_value(json!({
            "metadata": { "name": "payment-abc", "namespace": "shop",
                          "labels": { SERVICE_NAME_LABEL: "payment" } },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": "http", "port": 8080 }, { "name": "admin", "port": 9001 }]
        }))
        .unwrap();
        (Arc::new(svc), Arc::new(slice))
    }

    #[test]
    fn services_take_their_ready_mesh_endpoints_and_resolve_named_ports() {
        let (svc, slice) =
            service_and_slice(&[("payment-1", true), ("payment-2", false), ("outside", true)]);
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled"))],
            pods: vec![
                pod(
                    "shop",
                    "payment-1",
                    "n1",
                    "10.1.0.2",
                    json!({ "app": "payment" }),
                ),
                pod(
                    "shop",
                    "payment-2",
                    "n2",
                    "10.1.0.3",
                    json!({ "app": "payment" }),
                ),
            ],
            services: vec![svc],
            slices: vec![slice],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        let s = &t.config.services[&ObjectKey::new("shop", "payment")];
        assert_eq!(s.vips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let ports: Vec<_> = s.ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, [(80, 8080), (9000, 9001)], "UDP left out");
        // A value the mesh does not speak is not a mistake: relayed as bytes.
        let protocols: Vec<_> = s.ports.iter().map(|p| p.app_protocol).collect();
        assert_eq!(protocols, [Some(AppProtocol::Http), None]);
        let eps: Vec<_> = t.config.endpoints(s).map(|w| w.key.to_string()).collect();
        assert_eq!(eps, ["shop/payment-1"], "ready and in the mesh only");

        // No endpoint in the mesh: not a mesh service (its clients reach it as before).
        let (svc, slice) = service_and_slice(&[("payment-1", false)]);
        let objects = Objects {
            services: vec![svc],
            slices: vec![slice],
            ..objects
        };
        let t = translate(&objects, &MeshConfig::default());
        assert!(t.config.services.is_empty());

        // Unless a route splits it: its clients then go to the route's backends.
        let route = custom(
            &ApiResource::erase::<ServiceRouteCrd>(&()),
            "shop",
            "cut-over",
            json!({ "service": "payment", "backends": [{ "service": "payment-v2", "weight": 1 }] }),
        );
        let routed = Objects {
            routes: vec![route],
            ..objects.clone()
        };
        let t = translate(&routed, &MeshConfig::default());
        let s = &t.config.services[&ObjectKey::new("shop", "payment")];
        assert_eq!(t.config.endpoints(s).count(), 0);
    }

    /// Regression (review of issue 22): a Service's EndpointSlice naming a pod of another
    /// namespace put that pod behind the Service, where the Service's namespace's traffic
    /// policies (a rate limit) reached it.
    #[test]
    fn endpoints_in_another_namespace_are_left_out() {
        let (svc, slice) = service_and_slice(&[("victim", true)]);
        let mut slice = (*slice).clone();
        for e in slice.endpoints.iter_mut().flatten() {
            if let Some(r) = e.target_ref.as_mut() {
                r.namespace = Some("bank".into());
            }
        }
        let objects = Objects {
            namespaces: vec![
                namespace("shop", Some("enabled")),
                namespace("bank", Some("enabled")),
            ],
            pods: vec![pod("bank", "victim", "n1", "10.1.0.2", json!({}))],
            services: vec![svc],
            slices: vec![Arc::new(slice)],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        assert!(t.config.services.is_empty());
        assert!(
            t.problems
                .iter()
                .any(|p| p.contains("endpoint bank/victim left out")),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn a_bad_policy_is_left_out_with_its_reason_and_the_others_stay() {
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled"))],
            pods: vec![pod(
                "shop",
                "payment-1",
                "n1",
                "10.1.0.2",
                json!({ "app": "payment" }),
            )],
            policies: vec![
                policy(
                    "shop",
                    "good",
                    json!({ "selector": { "matchLabels": { "app": "payment" } }, "action": "Deny",
                            "rules": [{ "sourceNamespaces": ["ops"] }] }),
                ),
                policy(
                    "shop",
                    "bad",
                    json!({ "action": "Deny", "rules": [{ "ports": [70000] }] }),
                ),
                policy(
                    "shop",
                    "l7",
                    json!({ "action": "Allow", "rules": [{ "paths": ["/admin"] }] }),
                ),
            ],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());
        let names: Vec<_> = t.config.policies.keys().map(ToString::to_string).collect();
        assert_eq!(names, ["shop/good"]);
        let good = &t.policies[&ObjectKey::new("shop", "good")];
        assert_eq!(good.verdict, Verdict::Accepted(Applies::Workloads(1)));
        assert_eq!(good.generation, Some(3));
        for bad in ["bad", "l7"] {
            match &t.policies[&ObjectKey::new("shop", bad)].verdict {
                Verdict::Invalid { reason } => {
                    assert!(reason.contains("spec.rules[0]"), "{reason}")
                }
                v => panic!("{bad}: {v:?}"),
            }
        }
        assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
    }

    fn invalid_reason(outcomes: &Outcomes, ns: &str, name: &str) -> String {
        match &outcomes[&ObjectKey::new(ns, name)].verdict {
            Verdict::Invalid { reason } => reason.clone(),
            v => panic!("{ns}/{name}: {v:?}"),
        }
    }

    fn binds(outcomes: &Outcomes, ns: &str, name: &str) -> Vec<String> {
        match &outcomes[&ObjectKey::new(ns, name)].verdict {
            Verdict::Accepted(Applies::Services(keys)) => {
                keys.iter().map(ToString::to_string).collect()
            }
            v => panic!("{ns}/{name}: {v:?}"),
        }
    }

    /// TrafficPolicies and ServiceRoutes as a config dir reads them: a bad one is left out
    /// alone, with the field the model names; of two routes of one Service port the first by
    /// name stays, whatever order the API lists them in.
    #[test]
    fn traffic_policies_and_routes_are_judged_one_by_one() {
        let tp = |ns: &str, name: &str, spec| {
            custom(&ApiResource::erase::<TrafficPolicyCrd>(&()), ns, name, spec)
        };
        let route = |name: &str, spec| {
            custom(
                &ApiResource::erase::<ServiceRouteCrd>(&()),
                "shop",
                name,
                spec,
            )
        };
        let canary = json!({ "service": "payment", "port": 80, "backends": [
            { "service": "payment", "weight": 90 },
            { "service": "payment-v2", "weight": 10 }] });
        let (svc, slice) = service_and_slice(&[("payment-1", true)]);
        let objects = Objects {
            namespaces: vec![namespace("shop", Some("enabled"))],
            pods: vec![pod("shop", "payment-1", "n1", "10.1.0.2", json!({}))],
            services: vec![svc],
            slices: vec![slice],
            traffic_policies: vec![
                tp("shop", "bad", json!({ "connect": { "maxAttempts": 0 } })),
                tp(
                    "shop",
                    "payment",
                    json!({ "services": ["payment"], "connect": { "timeout": "250ms" } }),
                ),
                tp("mycel-system", "mesh-wide", json!({ "idleTimeout": "1h" })),
                tp("other", "elsewhere", json!({})),
                tp("shop", "unknown-field", json!({ "retries": 3 })),
            ],
            // Listed out of order: the clash must still be decided by name.
            routes: vec![
                route("z-late", canary.clone()),
                route("a-canary", canary),
                route(
                    "no-backends",
                    json!({ "service": "payment", "backends": [] }),
                ),
            ],
            ..Objects::default()
        };
        let t = translate(&objects, &MeshConfig::default());

        let in_force: Vec<_> = t
            .config
            .traffic_policies
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            in_force,
            ["mycel-system/mesh-wide", "other/elsewhere", "shop/payment"]
        );
        let timeout = t.config.traffic_policies[&ObjectKey::new("shop", "payment")].connect;
        assert_eq!(timeout.map(|c| c.timeout.as_millis()), Some(250));
        let reason = invalid_reason(&t.traffic_policies, "shop", "bad");
        assert!(reason.starts_with("spec.connect.maxAttempts: "), "{reason}");
        assert!(invalid_reason(&t.traffic_policies, "shop", "unknown-field").contains("retries"));
        assert_eq!(
            binds(&t.traffic_policies, "shop", "payment"),
            ["shop/payment"]
        );
        assert_eq!(
            binds(&t.traffic_policies, "mycel-system", "mesh-wide"),
            ["shop/payment"]
        );
        assert!(binds(&t.traffic_policies, "other", "elsewhere").is_empty());
        assert_eq!(
            t.traffic_policies[&ObjectKey::new("shop", "payment")].generation,
            Some(3)
        );

        let routes: Vec<_> = t.config.routes.keys().map(ToString::to_string).collect();
        assert_eq!(routes, ["shop/a-canary"]);
        // payment-v2 is no mesh Service (yet): it binds only what exists.
        assert_eq!(binds(&t.routes, "shop", "a-canary"), ["shop/payment"]);
        assert_eq!(
            invalid_reason(&t.routes, "shop", "z-late"),
            "spec.service: shop/payment (port 80) is already routed by ServiceRoute shop/a-canary"
        );
        assert!(invalid_reason(&t.routes, "shop", "no-backends").starts_with("spec.backends: "));

        let mut problems = t.problems.clone();
        problems.sort();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems[0].starts_with("ServiceRoute shop/no-backends left out: spec.backends"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("ServiceRoute shop/z-late left out: spec.service"),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with("TrafficPolicy shop/bad left out: spec.connect.maxAttempts"),
            "{problems:?}"
        );
    }

    fn mesh(name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        let ar = ApiResource::erase::<mesh_model::crd::MeshConfigResource>(&());
        Arc::new(DynamicObject::new(name, &ar).data(json!({ "spec": spec })))
    }

    #[test]
    fn the_mesh_config_is_read_and_a_bad_one_keeps_the_settings_in_force() {
        let read = |meshes| {
            let objects = Objects {
                meshes,
                ..Objects::default()
            };
            let previous = MeshConfig {
                trust_domain: "previous.example".into(),
                ..MeshConfig::default()
            };
            let t = translate(&objects, &previous);
            (t.config.mesh.trust_domain, t.problems)
        };
        assert_eq!(read(vec![]).0, "cluster.local", "defaults without one");
        let (td, problems) = read(vec![mesh("mesh", json!({ "trustDomain": "corp.example" }))]);
        assert_eq!((td.as_str(), problems.len()), ("corp.example", 0));
        let (td, problems) = read(vec![mesh("mesh", json!({ "certTtl": "forever" }))]);
        assert_eq!(td, "previous.example");
        assert!(problems[0].contains("spec.certTtl"), "{problems:?}");
        let (td, problems) = read(vec![mesh("a", json!({})), mesh("b", json!({}))]);
        assert_eq!(td, "previous.example");
        assert!(problems[0].contains("only one"), "{problems:?}");
    }
}
