//! `mesh-cp explain`: the verdict for a connection between two workloads, and what decided it.
//!
//! It runs the same evaluator the nodes run, on the same compiled policies, from a config dir
//! (offline) or from a running control plane's config (its `/explain` endpoint). The source is
//! taken as the node's tunnel presents it: the workload's verified identity and labels, and its
//! address (each family it has, since CIDR rules can tell them apart).

use std::net::IpAddr;

use mesh_model::{
    authz::{PolicyIndex, Source, SourceWorkload},
    traffic, Config, MtlsMode, ObjectKey, Service, SpiffeId, Workload,
};
use serde::{Deserialize, Serialize};

/// What `explain` reports, also the JSON of `/explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub source_identity: String,
    /// One verdict per address family of the source.
    pub verdicts: Vec<Verdict>,
    /// Policies that select the destination, with action and mode.
    pub selecting: Vec<String>,
    /// When the destination is a Service: its route and the traffic settings of each backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
}

/// How the source's node proxy treats a new connection to a Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub service: String,
    pub port: u16,
    /// The port's declared `appProtocol`; `None`: relayed as bytes.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The ServiceRoute that splits it, if any.
    pub route: Option<String>,
    /// Without a route, the Service itself with weight 1.
    pub backends: Vec<BackendTraffic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendTraffic {
    pub service: String,
    pub port: u16,
    pub weight: u32,
    /// Endpoints with an address, from the config.
    pub endpoints: usize,
    /// Why it takes no connection, when it takes none.
    pub problem: Option<String>,
    /// `(section, value, policy or "default")`.
    pub settings: Vec<(String, String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub source_address: Option<IpAddr>,
    pub allowed: bool,
    /// `namespace/name` or `default`.
    pub policy: String,
    /// Rule index, `no-allow-match` or `-`.
    pub rule: String,
    pub reason: String,
    /// DryRun rules that match, as `policy rule N (action)`.
    pub dry_run: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0:?} is not NAMESPACE/WORKLOAD")]
    BadKey(String),
    #[error("no workload {0} in the config")]
    Unknown(ObjectKey),
    #[error("port 0 is not a port")]
    BadPort,
    #[error("{service} has no port {port}")]
    NoSuchPort { service: ObjectKey, port: u16 },
    #[error("traffic settings apply to connections of mesh workloads; name one with --from")]
    PlaintextToService,
    #[error("give --from or --from-address")]
    NoClient,
    #[error("{flag}: {source}")]
    Flag {
        flag: &'static str,
        source: Box<ExplainError>,
    },
}

pub fn parse_key(s: &str) -> Result<ObjectKey, ExplainError> {
    match s.split_once('/') {
        Some((ns, name)) if mesh_model::is_dns_label(ns) && mesh_model::is_dns_label(name) => {
            Ok(ObjectKey::new(ns, name))
        }
        _ => Err(ExplainError::BadKey(s.to_owned())),
    }
}

/// What to explain, as `mesh-cp explain` and `mycel explain` take it on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Question {
    /// The client workload, NAMESPACE/NAME.
    #[arg(
        long,
        required_unless_present = "from_address",
        conflicts_with = "from_address"
    )]
    pub from: Option<String>,
    /// A plaintext client outside the mesh, by address (PERMISSIVE mode: only CIDR rules and
    /// `not…` clauses can match it).
    #[arg(long)]
    pub from_address: Option<IpAddr>,
    /// The destination, NAMESPACE/NAME: a workload (the policy verdict), or a Service (its
    /// route and the traffic settings of each backend; both when the names clash).
    #[arg(long)]
    pub to: String,
    /// Destination port: on the workload (after any service port mapping), or the Service's
    /// port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
}

impl Question {
    /// The client and the destination, checked.
    pub fn parse(&self) -> Result<(Client, ObjectKey), ExplainError> {
        let flag = |flag| {
            move |e| ExplainError::Flag {
                flag,
                source: Box::new(e),
            }
        };
        let from = match (&self.from, self.from_address) {
            (Some(key), _) => Client::Workload(parse_key(key).map_err(flag("--from"))?),
            (None, Some(ip)) => Client::Address(ip),
            (None, None) => return Err(ExplainError::NoClient),
        };
        Ok((from, parse_key(&self.to).map_err(flag("--to"))?))
    }
}

/// Who connects: a mesh workload (through its node, so with its verified identity), or a
/// plaintext client known only by its address (PERMISSIVE mode).
#[derive(Debug, Clone)]
pub enum Client {
    Workload(ObjectKey),
    Address(IpAddr),
}

pub fn explain(
    config: &Config,
    from: &Client,
    to: &ObjectKey,
    port: u16,
) -> Result<Explanation, ExplainError> {
    if port == 0 {
        return Err(ExplainError::BadPort);
    }
    let service = config.services.get(to);
    if !config.workloads.contains_key(to) {
        if let Some(service) = service {
            return explain_service(config, from, service, port);
        }
        return Err(ExplainError::Unknown(to.clone()));
    }
    let selections = config.selections();
    let selecting = selections
        .iter()
        .filter(|(_, selected)| selected.contains(to))
        .map(|(p, _)| format!("{} ({} {})", p.key, p.mode, p.action))
        .collect();
    let index = PolicyIndex::new(config.mesh.default_action, selections);
    let verdict = |address: Option<IpAddr>, workload: Option<SourceWorkload<'_>>| {
        let src = Source {
            address: address.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            workload,
        };
        let d = index.evaluate(to, port, &src);
        Verdict {
            source_address: address,
            allowed: d.allowed,
            policy: d.policy_name(),
            rule: d.rule_name(),
            reason: d.to_string(),
            dry_run: d
                .dry_run
                .iter()
                .map(|h| format!("{h} ({})", h.action))
                .collect(),
        }
    };
    let (from_name, source_identity, verdicts) = match from {
        Client::Address(ip) => (
            format!("{ip} (plaintext)"),
            "none (plaintext)".to_owned(),
            vec![plaintext_verdict(config, *ip, port, verdict)],
        ),
        Client::Workload(key) => {
            let (source, identity, identity_uri) = client(config, key)?;
            let workload = SourceWorkload {
                identity: &identity_uri,
                namespace: &identity.namespace,
                labels: &source.labels,
            };
            // One address per family: the data path sends from the source's address in the
            // destination's family.
            let mut addresses: Vec<Option<IpAddr>> = [true, false]
                .into_iter()
                .filter_map(|v4| source.addresses.iter().find(|a| a.is_ipv4() == v4))
                .map(|a| Some(*a))
                .collect();
            if addresses.is_empty() {
                addresses.push(None);
            }
            let verdicts = addresses
                .into_iter()
                .map(|a| verdict(a, Some(workload)))
                .collect();
            (key.to_string(), identity_uri.clone(), verdicts)
        }
    };
    let traffic = match (service, from) {
        (Some(service), Client::Workload(key)) => traffic(config, key, service, port).ok(),
        _ => None,
    };
    Ok(Explanation {
        from: from_name,
        to: to.to_string(),
        port,
        source_identity,
        verdicts,
        selecting,
        traffic,
    })
}

/// A Service as the destination: its route and traffic settings, no verdict (each endpoint
/// decides for itself; explain one by its workload name).
fn explain_service(
    config: &Config,
    from: &Client,
    service: &Service,
    port: u16,
) -> Result<Explanation, ExplainError> {
    let Client::Workload(key) = from else {
        return Err(ExplainError::PlaintextToService);
    };
    let (_, _, source_identity) = client(config, key)?;
    Ok(Explanation {
        from: key.to_string(),
        to: service.key.to_string(),
        port,
        source_identity,
        verdicts: Vec::new(),
        selecting: Vec::new(),
        traffic: Some(traffic(config, key, service, port)?),
    })
}

/// What the source's node does with a new connection to `port` of `service`: the same
/// resolution the node runs (`mesh_model::traffic`).
fn traffic(
    config: &Config,
    from: &ObjectKey,
    service: &Service,
    port: u16,
) -> Result<Traffic, ExplainError> {
    let Some(service_port) = service.ports.iter().find(|p| p.port == port) else {
        return Err(ExplainError::NoSuchPort {
            service: service.key.clone(),
            port,
        });
    };
    let (source, identity, identity_uri) = client(config, from)?;
    let src = Source {
        address: source
            .addresses
            .first()
            .copied()
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        workload: Some(SourceWorkload {
            identity: &identity_uri,
            namespace: &identity.namespace,
            labels: &source.labels,
        }),
    };
    let route = traffic::route_for(config.routes.values(), &service.key, port);
    let backends: Vec<(ObjectKey, u16, u32)> = match route {
        Some(r) => r
            .backends
            .iter()
            .map(|b| (r.backend_key(b), b.port_for(port), b.weight))
            .collect(),
        None => vec![(service.key.clone(), port, 1)],
    };
    let root = &config.mesh.root_namespace;
    let backends = backends
        .into_iter()
        .map(|(key, port, weight)| {
            let found = config.services.get(&key);
            let endpoints = found.map_or(0, |s| {
                config
                    .endpoints(s)
                    .filter(|w| !w.addresses.is_empty())
                    .count()
            });
            let problem = match found {
                None => Some(format!("no Service {key}")),
                Some(s) if !s.ports.iter().any(|p| p.port == port) => {
                    Some(format!("{key} has no port {port}"))
                }
                Some(_) if endpoints == 0 => Some(format!("{key} has no endpoints")),
                Some(_) => None,
            };
            let candidates =
                traffic::candidates(config.traffic_policies.values(), root, &key, port);
            let effective = traffic::resolve(candidates, &src);
            let settings = effective
                .sections()
                .into_iter()
                .map(|(name, value, from)| {
                    let from = from.map_or("default".to_owned(), ToString::to_string);
                    (name.to_owned(), value, from)
                })
                .collect();
            BackendTraffic {
                service: key.to_string(),
                port,
                weight,
                endpoints,
                problem,
                settings,
            }
        })
        .collect();
    Ok(Traffic {
        service: service.key.to_string(),
        port,
        protocol: service_port.app_protocol.map(|a| a.to_string()),
        route: route.map(|r| r.key.to_string()),
        backends,
    })
}

/// The client workload `key`, its SPIFFE ID and that ID as a URI (what policies match), as
/// its node's tunnel presents it.
fn client<'a>(
    config: &'a Config,
    key: &ObjectKey,
) -> Result<(&'a Workload, SpiffeId, String), ExplainError> {
    let source = config
        .workloads
        .get(key)
        .ok_or_else(|| ExplainError::Unknown(key.clone()))?;
    let identity = source.identity(&config.mesh.trust_domain);
    let uri = identity.to_string();
    Ok((source, identity, uri))
}

/// Plaintext meets the mTLS mode before any policy: open ports pass untouched, STRICT drops
/// the rest, PERMISSIVE hands it to policy.
fn plaintext_verdict(
    config: &Config,
    ip: IpAddr,
    port: u16,
    by_policy: impl Fn(Option<IpAddr>, Option<SourceWorkload<'_>>) -> Verdict,
) -> Verdict {
    let mtls = |allowed: bool, rule: &str, reason: String| Verdict {
        source_address: Some(ip),
        allowed,
        policy: "mtls".into(),
        rule: rule.into(),
        reason,
        dry_run: Vec::new(),
    };
    if config.mesh.plaintext_ports.contains(&port) {
        mtls(
            true,
            "plaintext-port",
            format!("ALLOW: port {port} takes plaintext untouched (MeshConfig spec.mtls.plaintextPorts); no policy applies"),
        )
    } else if config.mesh.mtls == MtlsMode::Strict {
        mtls(
            false,
            "strict",
            "DENY: the mesh's mTLS mode is Strict; plaintext is dropped before policy".into(),
        )
    } else {
        by_policy(Some(ip), None)
    }
}

/// The human form: the verdict first, so `explain … | head -1` answers the question.
pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let same = e
        .verdicts
        .windows(2)
        .all(|w| (w[0].allowed, &w[0].reason) == (w[1].allowed, &w[1].reason));
    let shown = if same {
        &e.verdicts[..e.verdicts.len().min(1)]
    } else {
        &e.verdicts[..]
    };
    if let Some(t) = &e.traffic {
        out += &render_traffic(&e.from, t);
        if e.verdicts.is_empty() {
            return out;
        }
    }
    for v in shown {
        let verdict = if v.allowed { "ALLOW" } else { "DENY" };
        let from = match (same, v.source_address) {
            (false, Some(a)) => format!(" (from {a})"),
            _ => String::new(),
        };
        out += &format!(
            "{verdict} {} -> {} port {}{from}\n  decided by: {}\n  policy: {}  rule: {}\n",
            e.from, e.to, e.port, v.reason, v.policy, v.rule
        );
        for d in &v.dry_run {
            out += &format!("  dry-run match (not enforced): {d}\n");
        }
    }
    out += &format!("  source identity: {}\n", e.source_identity);
    let addrs: Vec<String> = e
        .verdicts
        .iter()
        .filter_map(|v| v.source_address.map(|a| a.to_string()))
        .collect();
    if !addrs.is_empty() {
        out += &format!("  source addresses: {}\n", addrs.join(", "));
    }
    if e.selecting.is_empty() {
        out += &format!("  no policy selects {}\n", e.to);
    } else {
        out += &format!(
            "  policies selecting {}: {}\n",
            e.to,
            e.selecting.join(", ")
        );
    }
    out
}

fn render_traffic(from: &str, t: &Traffic) -> String {
    let mut out = format!(
        "TRAFFIC {from} -> service {} port {}
",
        t.service, t.port
    );
    out += &match &t.protocol {
        Some(p) => format!("  protocol: {p} (appProtocol)\n"),
        None => "  protocol: bytes (no appProtocol)\n".to_owned(),
    };
    let total: u64 = t
        .backends
        .iter()
        .filter(|b| b.problem.is_none())
        .map(|b| u64::from(b.weight))
        .sum();
    match &t.route {
        Some(r) => {
            out += &format!(
                "  route: {r}
"
            )
        }
        None => {
            out += "  route: none (the Service's own endpoints)
"
        }
    }
    for b in &t.backends {
        let share = match (&b.problem, total) {
            (None, 1..) => format!("{:.1} %", 100.0 * f64::from(b.weight) / total as f64),
            _ => "0 %".to_owned(),
        };
        out += &format!(
            "  backend {} port {}: weight {} ({share} of new connections), {} endpoints
",
            b.service, b.port, b.weight, b.endpoints
        );
        if let Some(p) = &b.problem {
            out += &format!(
                "    takes no connection: {p}
"
            );
        }
        for (name, value, from) in &b.settings {
            out += &format!(
                "    {name}: {value}  [{from}]
"
            );
        }
    }
    out
}

/// Asks a running control plane (its HTTP status address) for an explanation.
pub fn fetch(
    cp: &str,
    from: &Client,
    to: &str,
    port: u16,
) -> Result<Explanation, mesh_telemetry::client::ClientError> {
    // Keys are DNS labels and a slash, addresses are digits, dots and colons (all checked
    // before this), so they need no URL escaping.
    let from = match from {
        Client::Workload(key) => format!("from={key}"),
        Client::Address(ip) => format!("from_address={ip}"),
    };
    mesh_telemetry::client::get_json(cp, &format!("/explain?{from}&to={to}&port={port}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config() -> Config {
        let w = |name: &str, ip: &str| {
            format!("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}\nspec: {{node: n1, netns: /run/netns/{name}, addresses: ['{ip}'], serviceAccount: {name}}}\n---\n")
        };
        let text = format!(
            "{}{}{}apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: payment-callers, namespace: shop}}\nspec: {{selector: {{matchLabels: {{app: payment}}}}, action: Allow, rules: [{{sourceLabels: {{app: order}}, ports: [8080]}}]}}\n",
            w("order", "10.0.1.2"),
            w("analytics", "10.0.1.3"),
            w("payment", "10.0.2.2"),
        );
        mesh_model::parse(&[(PathBuf::from("c.yaml"), text)]).unwrap()
    }

    #[test]
    fn explains_allow_and_deny() {
        let c = config();
        let key = |s| parse_key(s).unwrap();
        let from = |s| Client::Workload(key(s));
        let e = explain(&c, &from("shop/order"), &key("shop/payment"), 8080).unwrap();
        assert!(e.verdicts[0].allowed);
        assert_eq!(
            (e.verdicts[0].policy.as_str(), e.verdicts[0].rule.as_str()),
            ("shop/payment-callers", "0")
        );
        let text = render(&e);
        assert!(
            text.starts_with("ALLOW shop/order -> shop/payment port 8080\n"),
            "{text}"
        );

        let e = explain(&c, &from("shop/analytics"), &key("shop/payment"), 8080).unwrap();
        assert!(!e.verdicts[0].allowed);
        assert_eq!(e.verdicts[0].rule, "no-allow-match");
        assert!(render(&e).starts_with("DENY "));

        assert!(matches!(
            explain(&c, &from("shop/nope"), &key("shop/payment"), 1),
            Err(ExplainError::Unknown(_))
        ));
        // A plaintext client has no identity: the Allow policy for order cannot match it.
        let plain = Client::Address("192.168.1.1".parse().unwrap());
        let e = explain(&c, &plain, &key("shop/payment"), 8080).unwrap();
        assert!(!e.verdicts[0].allowed);
        assert!(render(&e).starts_with("DENY 192.168.1.1 (plaintext) -> shop/payment"));
        assert!(parse_key("shop").is_err());
        assert!(parse_key("Shop/a").is_err());
    }

    #[test]
    fn explains_a_services_route_and_traffic_settings() {
        let extra = "---\napiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {name: pay, namespace: shop}\nspec: {vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080, appProtocol: http}], selector: {app: payment}}\n---\napiVersion: mycel.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: canary, namespace: shop}\nspec: {service: pay, backends: [{service: pay, weight: 90}, {service: pay-v2, weight: 10}]}\n---\napiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: fast, namespace: shop}\nspec: {services: [pay], connect: {timeout: 500ms}, http: {requestTimeout: 2s}}\n";
        let mut files = vec![(PathBuf::from("c.yaml"), String::new())];
        let w = |name: &str, ip: &str| {
            format!("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}\nspec: {{node: n1, netns: /run/netns/{name}, addresses: ['{ip}'], serviceAccount: {name}}}\n---\n")
        };
        files[0].1 = format!(
            "{}{}{extra}",
            w("order", "10.0.1.2"),
            w("payment", "10.0.2.2")
        );
        let c = mesh_model::parse(&files).unwrap();
        let from = Client::Workload(parse_key("shop/order").unwrap());
        let e = explain(&c, &from, &parse_key("shop/pay").unwrap(), 80).unwrap();
        let t = e.traffic.as_ref().unwrap();
        assert_eq!(t.route.as_deref(), Some("shop/canary"));
        assert_eq!(t.backends[0].endpoints, 1);
        assert_eq!(
            t.backends[1].problem.as_deref(),
            Some("no Service shop/pay-v2")
        );
        let connect = &t.backends[0].settings[0];
        assert_eq!(connect.0, "connect");
        assert!(
            connect.1.starts_with("timeout 500ms, maxAttempts 3"),
            "{connect:?}"
        );
        assert_eq!(connect.2, "shop/fast");
        assert_eq!(
            t.backends[0].settings[3],
            ("loadBalancer".into(), "RoundRobin".into(), "default".into())
        );
        let text = render(&e);
        assert_eq!(t.protocol.as_deref(), Some("http"));
        let http = t.backends[0].settings.last().unwrap();
        assert_eq!(http.0, "http");
        assert!(
            http.1.starts_with("requestTimeout 2s, retries: attempts 2"),
            "{http:?}"
        );
        assert_eq!(http.2, "shop/fast");
        assert!(text.starts_with("TRAFFIC shop/order -> service shop/pay port 80\n  protocol: http (appProtocol)\n  route: shop/canary\n  backend shop/pay port 80: weight 90 (100.0 % of new connections), 1 endpoints\n"), "{text}");
        assert!(
            text.contains("takes no connection: no Service shop/pay-v2"),
            "{text}"
        );
        assert!(matches!(
            explain(&c, &from, &parse_key("shop/pay").unwrap(), 81),
            Err(ExplainError::NoSuchPort { .. })
        ));
        let plain = Client::Address("192.168.1.1".parse().unwrap());
        assert!(matches!(
            explain(&c, &plain, &parse_key("shop/pay").unwrap(), 80),
            Err(ExplainError::PlaintextToService)
        ));
    }
}
