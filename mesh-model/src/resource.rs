//! One YAML document into one typed resource.
//!
//! Each kind has a private `serde` shape that rejects unknown fields, and a public type that
//! holds only validated values. Validation here is per document; checks that span documents
//! live in `config.rs`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::{
    duration, identity,
    object_key::ObjectKey,
    policy::{self, AccessPolicy},
    spec::{AccessPolicySpec, Action, AppProtocol, LocalHop, MeshConfigSpec, MtlsMode, Transport},
    traffic::{self, ServiceRoute, TrafficPolicy},
    validate::{check_label, check_labels, one_line},
    SpiffeId,
};

pub const API_VERSION: &str = "mycel.dev/v1alpha1";

/// Mesh-wide settings. At most one per configuration; defaults apply when there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub trust_domain: String,
    /// Lifetime of workload certificates; nodes renew at half of it.
    pub cert_ttl: Duration,
    /// Verdict for connections no enforced policy decides.
    pub default_action: Action,
    /// AccessPolicies of this namespace select workloads of every namespace.
    pub root_namespace: String,
    /// What happens to plaintext TCP to mesh workloads.
    pub mtls: MtlsMode,
    /// Workload ports that take plaintext untouched, sorted.
    pub plaintext_ports: Vec<u16>,
    /// What sources use for tunnels to other nodes.
    pub transport: Transport,
    /// How bytes cross the hop between an application and the node proxy in its pod.
    pub local_hop: LocalHop,
}

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MIN_CERT_TTL: Duration = Duration::from_secs(10);
pub const MAX_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);
pub const DEFAULT_ROOT_NAMESPACE: &str = "mycel-system";
/// Ports the node proxy uses inside every pod: outbound (15001), plaintext inbound (15006) and
/// the tunnel (15008).
pub const RESERVED_PORTS: [u16; 3] = [15001, 15006, 15008];

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            cert_ttl: DEFAULT_CERT_TTL,
            default_action: Action::Allow,
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            mtls: MtlsMode::Permissive,
            plaintext_ports: Vec::new(),
            transport: Transport::default(),
            local_hop: LocalHop::default(),
        }
    }
}

/// A process group on a host, in its own network namespace, with one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub key: ObjectKey,
    pub labels: BTreeMap<String, String>,
    /// Name of the node whose daemon captures it.
    pub node: String,
    /// Path of its network namespace on that node (e.g. `/run/netns/web-1`).
    pub netns: PathBuf,
    /// Its addresses inside that netns; how other workloads reach it.
    pub addresses: Vec<IpAddr>,
    pub service_account: String,
}

impl Workload {
    pub fn identity(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, &self.key.namespace, &self.service_account)
    }

    /// Whether the workload carries every one of `labels`.
    pub fn has_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// The application it is a replica of, as the metrics name it: [`application`].
    pub fn application(&self) -> &str {
        application(&self.labels, &self.key.name)
    }
}

/// Labels that name an application, most specific first.
pub const APP_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// The application a workload with `labels` and `name` is a replica of: what its first
/// non-empty [`APP_LABELS`] says, else its own name. Every replica shares the metrics' series
/// and the dashboard's node.
pub fn application<'a>(labels: &'a BTreeMap<String, String>, name: &'a str) -> &'a str {
    APP_LABELS
        .iter()
        .find_map(|l| labels.get(*l).filter(|v| !v.is_empty()))
        .map_or(name, String::as_str)
}

/// A virtual IP whose connections go to the workloads its selector picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Labels a workload of the same namespace must all carry to be an endpoint.
    pub selector: BTreeMap<String, String>,
    /// The endpoints, when the source lists them rather than the selector picking them: in
    /// Kubernetes, the ready pods of the service's EndpointSlices. `None` in universal mode.
    pub endpoints: Option<std::collections::BTreeSet<ObjectKey>>,
}

impl Service {
    /// Whether `w` is one of the service's endpoints, judged by `w` alone (its namespace, its
    /// labels or its place in the list): what [`crate::Config::endpoints`] finds.
    pub fn selects(&self, w: &Workload) -> bool {
        w.key.namespace == self.key.namespace
            && match &self.endpoints {
                Some(listed) => listed.contains(&w.key),
                None => w.has_labels(&self.selector),
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
    /// What it speaks, as declared; `None`: relayed as bytes.
    pub app_protocol: Option<AppProtocol>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    MeshConfig(MeshConfig),
    Workload(Workload),
    Service(Service),
    AccessPolicy(AccessPolicy),
    TrafficPolicy(TrafficPolicy),
    ServiceRoute(ServiceRoute),
}

impl Resource {
    /// Its kind and key: what one config holds at most one of.
    pub fn identity(&self) -> (&'static str, Option<&ObjectKey>) {
        match self {
            Resource::MeshConfig(_) => ("MeshConfig", None),
            Resource::Workload(w) => ("Workload", Some(&w.key)),
            Resource::Service(s) => ("Service", Some(&s.key)),
            Resource::AccessPolicy(p) => ("AccessPolicy", Some(&p.key)),
            Resource::TrafficPolicy(p) => ("TrafficPolicy", Some(&p.key)),
            Resource::ServiceRoute(r) => ("ServiceRoute", Some(&r.key)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    node: String,
    netns: PathBuf,
    #[serde(default)]
    addresses: Vec<String>,
    service_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    vips: Vec<String>,
    ports: Vec<RawServicePort>,
    selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    name: Option<String>,
    port: u16,
    target_port: Option<u16>,
    app_protocol: Option<String>,
}

/// Parses one document. The error names the field and is one line.
pub fn parse_document(value: serde_yaml::Value) -> Result<Resource, String> {
    let doc: Document = serde_yaml::from_value(value).map_err(|e| one_line(&e))?;
    if doc.api_version != API_VERSION {
        return Err(format!(
            "apiVersion: expected {API_VERSION}, found {}",
            doc.api_version
        ));
    }
    let meta = doc.metadata;
    for (field, value) in [
        ("metadata.name", &meta.name),
        ("metadata.namespace", &meta.namespace),
    ] {
        check_label(field, value)?;
    }
    let key = ObjectKey {
        namespace: meta.namespace,
        name: meta.name,
    };
    let spec = doc.spec;
    match doc.kind.as_str() {
        "MeshConfig" => mesh_config(spec).map(Resource::MeshConfig),
        "Workload" => workload(key, meta.labels, spec).map(Resource::Workload),
        "Service" => service(key, spec).map(Resource::Service),
        "AccessPolicy" => access_policy(key, spec).map(Resource::AccessPolicy),
        "TrafficPolicy" => {
            traffic::validate_policy(key, spec_of(spec)?).map(Resource::TrafficPolicy)
        }
        "ServiceRoute" => {
            traffic::validate_route(key, required_spec(spec)?).map(Resource::ServiceRoute)
        }
        other => Err(format!(
            "kind: {other:?} is not one of MeshConfig, Workload, Service, AccessPolicy, TrafficPolicy, ServiceRoute"
        )),
    }
}

fn spec_of<T: serde::de::DeserializeOwned + Default>(spec: serde_yaml::Value) -> Result<T, String> {
    if spec.is_null() {
        return Ok(T::default());
    }
    typed_spec(spec)
}

fn required_spec<T: serde::de::DeserializeOwned>(spec: serde_yaml::Value) -> Result<T, String> {
    if spec.is_null() {
        return Err("spec: missing".into());
    }
    typed_spec(spec)
}

/// The typed spec, or an error that names the field by its path (`spec.rules[0].ports`).
fn typed_spec<T: serde::de::DeserializeOwned>(spec: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            "spec".to_owned()
        } else {
            format!("spec.{path}")
        };
        format!("{at}: {}", one_line(e.inner()))
    })
}

fn access_policy(key: ObjectKey, spec: serde_yaml::Value) -> Result<AccessPolicy, String> {
    policy::reject_l7_fields(&spec)?;
    let spec: AccessPolicySpec = required_spec(spec)?;
    policy::validate(key, spec)
}

fn mesh_config(spec: serde_yaml::Value) -> Result<MeshConfig, String> {
    let raw: MeshConfigSpec = spec_of(spec)?;
    let mut out = MeshConfig::default();
    if let Some(td) = raw.trust_domain {
        if !identity::is_trust_domain(&td) {
            return Err(format!(
                "spec.trustDomain: {td:?} is not a trust domain (lower-case letters, digits, '.', '-', '_')"
            ));
        }
        out.trust_domain = td;
    }
    if let Some(ttl) = raw.cert_ttl {
        let d = duration::parse(&ttl).map_err(|e| format!("spec.certTtl: {e}"))?;
        if d < MIN_CERT_TTL || d > MAX_CERT_TTL {
            return Err(format!(
                "spec.certTtl: {ttl} is outside {} to {}",
                duration::format(MIN_CERT_TTL),
                duration::format(MAX_CERT_TTL)
            ));
        }
        out.cert_ttl = d;
    }
    if let Some(action) = raw.default_action {
        out.default_action = action;
    }
    if let Some(ns) = raw.root_namespace {
        check_label("spec.rootNamespace", &ns)?;
        out.root_namespace = ns;
    }
    let mtls = raw.mtls.unwrap_or_default();
    out.mtls = mtls.mode.unwrap_or_default();
    for (i, p) in mtls
        .plaintext_ports
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("spec.mtls.plaintextPorts[{i}]");
        let port = u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{field}: {p} is not a port (1-65535)"))?;
        if RESERVED_PORTS.contains(&port) {
            return Err(format!(
                "{field}: {port} is a port of the node proxy inside every pod, not a workload port"
            ));
        }
        if out.plaintext_ports.contains(&port) {
            return Err(format!("{field}: {port} is listed twice"));
        }
        out.plaintext_ports.push(port);
    }
    out.plaintext_ports.sort_unstable();
    out.transport = raw.transport.unwrap_or_default();
    out.local_hop = raw.local_hop.unwrap_or_default();
    Ok(out)
}

fn workload(
    key: ObjectKey,
    labels: BTreeMap<String, String>,
    spec: serde_yaml::Value,
) -> Result<Workload, String> {
    let raw: RawWorkload = required_spec(spec)?;
    check_label("spec.node", &raw.node)?;
    if !raw.netns.is_absolute() {
        return Err(format!(
            "spec.netns: {} is not an absolute path",
            raw.netns.display()
        ));
    }
    let addresses = parse_ips("spec.addresses", &raw.addresses)?;
    let service_account = raw.service_account.unwrap_or_else(|| "default".into());
    if !identity::is_sa_name(&service_account) {
        return Err(format!(
            "spec.serviceAccount: {service_account:?} is not a valid service-account name"
        ));
    }
    check_labels("metadata.labels", &labels)?;
    Ok(Workload {
        key,
        labels,
        node: raw.node,
        netns: raw.netns,
        addresses,
        service_account,
    })
}

fn service(key: ObjectKey, spec: serde_yaml::Value) -> Result<Service, String> {
    let raw: RawService = required_spec(spec)?;
    if raw.vips.is_empty() {
        return Err("spec.vips: at least one address is required".into());
    }
    let vips = parse_ips("spec.vips", &raw.vips)?;
    if raw.ports.is_empty() {
        return Err("spec.ports: at least one port is required".into());
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in raw.ports.into_iter().enumerate() {
        let target_port = p.target_port.unwrap_or(p.port);
        if p.port == 0 || target_port == 0 {
            return Err(format!("spec.ports[{i}]: port 0 is not a port"));
        }
        if ports.iter().any(|q| q.port == p.port) {
            return Err(format!("spec.ports[{i}].port: {} is listed twice", p.port));
        }
        if let Some(name) = &p.name {
            check_label(&format!("spec.ports[{i}].name"), name)?;
        }
        let app_protocol = p
            .app_protocol
            .map(|text| {
                AppProtocol::parse(&text).ok_or_else(|| {
                    format!(
                        "spec.ports[{i}].appProtocol: {text:?} is not one of http, h2c, grpc (leave it out for a port relayed as bytes)"
                    )
                })
            })
            .transpose()?;
        ports.push(ServicePort {
            name: p.name,
            port: p.port,
            target_port,
            app_protocol,
        });
    }
    if raw.selector.is_empty() {
        return Err(
            "spec.selector: an empty selector would select every workload of the namespace; name at least one label"
                .into(),
        );
    }
    check_labels("spec.selector", &raw.selector)?;
    Ok(Service {
        key,
        vips,
        ports,
        selector: raw.selector,
        endpoints: None,
    })
}

fn parse_ips(field: &str, values: &[String]) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let ip: IpAddr = v
            .parse()
            .map_err(|_| format!("{field}[{i}]: {v:?} is not an IP address"))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(format!(
                "{field}[{i}]: {ip} cannot be a workload or service address"
            ));
        }
        // One address, one spelling: otherwise two workloads could hold 10.0.0.5 and
        // ::ffff:10.0.0.5, which are the same destination to a socket.
        if ip != ip.to_canonical() {
            return Err(format!(
                "{field}[{i}]: {ip} is an IPv4-mapped IPv6 address; write it as {}",
                ip.to_canonical()
            ));
        }
        if out.contains(&ip) {
            return Err(format!("{field}[{i}]: {ip} is listed twice"));
        }
        out.push(ip);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Resource, String> {
        parse_document(serde_yaml::from_str(text).unwrap())
    }

    const HEAD: &str = "apiVersion: mycel.dev/v1alpha1\n";

    #[test]
    fn parses_each_kind() {
        let w = parse(&format!("{HEAD}kind: Workload\nmetadata: {{name: web, namespace: shop, labels: {{app: web}}}}\nspec: {{node: n1, netns: /run/netns/web, addresses: [10.0.0.2, 'fd00::2'], serviceAccount: web-sa}}\n")).unwrap();
        let Resource::Workload(w) = w else { panic!() };
        assert_eq!(w.key.to_string(), "shop/web");
        assert_eq!(
            w.identity("td").to_string(),
            "spiffe://td/ns/shop/sa/web-sa"
        );
        assert_eq!(w.addresses.len(), 2);

        let s = parse(&format!("{HEAD}kind: Service\nmetadata: {{name: web}}\nspec: {{vips: [10.96.0.1], ports: [{{port: 80, targetPort: 8080}}, {{port: 443}}], selector: {{app: web}}}}\n")).unwrap();
        let Resource::Service(s) = s else { panic!() };
        assert_eq!(s.ports[0].target_port, 8080);
        assert_eq!(s.ports[1].target_port, 443);
        assert_eq!(s.ports[0].app_protocol, None, "bytes unless declared");

        let s = parse(&format!("{HEAD}kind: Service\nmetadata: {{name: api}}\nspec: {{vips: [10.96.0.2], ports: [{{port: 80, appProtocol: http}}, {{port: 81, appProtocol: h2c}}, {{port: 82, appProtocol: grpc}}], selector: {{app: api}}}}\n")).unwrap();
        let Resource::Service(s) = s else { panic!() };
        let protocols: Vec<_> = s.ports.iter().map(|p| p.app_protocol).collect();
        assert_eq!(
            protocols,
            [
                Some(AppProtocol::Http),
                Some(AppProtocol::H2c),
                Some(AppProtocol::Grpc)
            ]
        );
        let e = parse(&format!("{HEAD}kind: Service\nmetadata: {{name: api}}\nspec: {{vips: [10.96.0.2], ports: [{{port: 80}}, {{port: 443, appProtocol: https}}], selector: {{app: api}}}}\n")).unwrap_err();
        assert!(
            e.starts_with("spec.ports[1].appProtocol: \"https\" is not one of http, h2c, grpc"),
            "{e}"
        );

        let m = parse(&format!(
            "{HEAD}kind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{certTtl: 20s, transport: quic}}\n"
        ))
        .unwrap();
        assert_eq!(
            m,
            Resource::MeshConfig(MeshConfig {
                cert_ttl: Duration::from_secs(20),
                transport: crate::Transport::Quic,
                ..MeshConfig::default()
            })
        );
        assert_eq!(MeshConfig::default().local_hop, crate::LocalHop::Tcp);
        let m = parse(&format!(
            "{HEAD}kind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{localHop: sockmap}}\n"
        ))
        .unwrap();
        assert_eq!(
            m,
            Resource::MeshConfig(MeshConfig {
                local_hop: crate::LocalHop::Sockmap,
                ..MeshConfig::default()
            })
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("kind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x, nets: 1}", "nets"),
            ("kind: Workload\nmetadata: {name: A}\nspec: {node: n1, netns: /x}", "metadata.name"),
            ("kind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: x}", "spec.netns"),
            ("kind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x, addresses: [1.2.3]}", "spec.addresses[0]"),
            ("kind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x, addresses: ['10.0.0.1', '::ffff:10.0.0.5']}", "spec.addresses[1]: ::ffff:10.0.0.5 is an IPv4-mapped"),
            ("kind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x, serviceAccount: 'A B'}", "spec.serviceAccount"),
            ("kind: Workload\nmetadata: {name: a}", "spec: missing"),
            ("kind: Service\nmetadata: {name: a}\nspec: {vips: [], ports: [{port: 1}], selector: {a: b}}", "spec.vips"),
            ("kind: Service\nmetadata: {name: a}\nspec: {vips: [10.0.0.1], ports: [{port: 0}], selector: {a: b}}", "spec.ports[0]"),
            ("kind: Service\nmetadata: {name: a}\nspec: {vips: [10.0.0.1], ports: [{port: 1}, {port: 1}], selector: {a: b}}", "spec.ports[1].port"),
            ("kind: Service\nmetadata: {name: a}\nspec: {vips: [10.0.0.1], ports: [{port: 1}], selector: {}}", "spec.selector"),
            ("kind: Service\nmetadata: {name: a}\nspec: {vips: [127.0.0.1], ports: [{port: 1}], selector: {a: b}}", "spec.vips[0]"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {certTtl: 1s}", "spec.certTtl"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {trustDomain: 'A B'}", "spec.trustDomain"),
            ("kind: Pod\nmetadata: {name: a}", "kind"),
        ];
        for (body, needle) in cases {
            let e = parse(&format!("{HEAD}{body}\n")).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = parse("apiVersion: v1\nkind: Workload\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.contains("apiVersion"), "{e}");
    }
    #[test]
    fn parses_an_access_policy() {
        let p = parse(&format!("{HEAD}kind: AccessPolicy\nmetadata: {{name: pay, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: payment}}}}\n  action: Deny\n  mode: DryRun\n  rules:\n  - sourceIdentities: ['spiffe://cluster.local/ns/shop/sa/analytics', 'spiffe://cluster.local/ns/batch/*']\n    notSourceNamespaces: [shop]\n    sourceLabels: {{app: analytics}}\n    sourceCidrs: [{{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]\n    ports: [8080, '9000-9100']\n    notPorts: [9050]\n")).unwrap();
        let Resource::AccessPolicy(p) = p else {
            panic!()
        };
        assert_eq!(p.key.to_string(), "shop/pay");
        assert_eq!(p.selector["app"], "payment");
        assert_eq!(
            (p.action, p.mode),
            (crate::Action::Deny, crate::Mode::DryRun)
        );
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].clauses.len(), 6);
        assert!(p.rules[0].clauses[1].negated);
    }

    #[test]
    fn policy_errors_name_the_field() {
        let rule = |r: &str| {
            format!(
                "kind: AccessPolicy\nmetadata: {{name: p}}\nspec: {{action: Allow, rules: [{r}]}}"
            )
        };
        let cases = [
            (rule("{sourceCidrs: [{cidr: 10.0.0.0/33}]}"), "spec.rules[0].sourceCidrs[0].cidr"),
            (rule("{sourceCidrs: [{cidr: 10.0.0.1/24}]}"), "spec.rules[0].sourceCidrs[0].cidr"),
            (rule("{sourceCidrs: [{cidr: 10.0.0.0/24, except: [10.9.0.0/24]}]}"), "spec.rules[0].sourceCidrs[0].except[0]"),
            (rule("{ports: [80]}, {ports: ['90-80']}"), "spec.rules[1].ports[0]"),
            (rule("{notPorts: [0]}"), "spec.rules[0].notPorts[0]"),
            (rule("{ports: [70000]}"), "spec.rules[0].ports[0]"),
            (rule("{}"), "spec.rules[0]: an empty rule"),
            (rule("{sourceNamespaces: []}"), "spec.rules[0].sourceNamespaces"),
            (rule("{sourceIdentities: ['spiffe://td/ns/*/sa/x']}"), "spec.rules[0].sourceIdentities[0]"),
            (rule("{sourceIdentities: ['web']}"), "spec.rules[0].sourceIdentities[0]"),
            (rule("{ports: [80], methods: [GET]}"), "spec.rules[0].methods: L7"),
            (rule("{ports: [80], paths: ['/admin']}"), "spec.rules[0].paths: L7"),
            (rule("{ports: [80], sourcePods: [a]}"), "spec.rules[0].sourcePods: unknown field"),
            (rule("{ports: 80}"), "spec.rules[0].ports: invalid type"),
            ("kind: AccessPolicy\nmetadata: {name: p}\nspec: {action: Allow, rules: []}".into(), "spec.rules: at least one"),
            ("kind: AccessPolicy\nmetadata: {name: p}\nspec: {action: Maybe, rules: [{ports: [1]}]}".into(), "Maybe"),
            ("kind: AccessPolicy\nmetadata: {name: p}\nspec: {action: Allow, hosts: [a], rules: [{ports: [1]}]}".into(), "spec.hosts: L7"),
            ("kind: AccessPolicy\nmetadata: {name: p}\nspec: {action: Allow, selector: {matchLabels: {'a b': c}}, rules: [{ports: [1]}]}".into(), "spec.selector.matchLabels"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {defaultAction: Block}".into(), "Block"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {rootNamespace: 'Not A Label'}".into(), "spec.rootNamespace"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {mtls: {mode: Strict, plaintextPorts: [8081, 70000]}}".into(), "spec.mtls.plaintextPorts[1]"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {mtls: {plaintextPorts: [15008]}}".into(), "spec.mtls.plaintextPorts[0]"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {mtls: {mode: strict}}".into(), "strict"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {transport: tcp}".into(), "tcp"),
            ("kind: MeshConfig\nmetadata: {name: m}\nspec: {localHop: splice}".into(), "splice"),
        ];
        for (body, needle) in cases {
            let e = parse(&format!("{HEAD}{body}\n")).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
