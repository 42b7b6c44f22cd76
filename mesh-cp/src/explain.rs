//! `mesh-cp explain`: the verdict for a connection between two workloads, and what decided it.
//!
//! It runs the same evaluator the nodes run, on the same compiled policies, from a config dir
//! (offline) or from a running control plane's config (its `/explain` endpoint). The source is
//! taken as the node's tunnel presents it: the workload's verified identity and labels, and its
//! address (each family it has, since CIDR rules can tell them apart).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use mesh_model::{
    authz::{PolicyIndex, Source, SourceWorkload},
    Config, MtlsMode, ObjectKey,
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
}

pub fn parse_key(s: &str) -> Result<ObjectKey, ExplainError> {
    match s.split_once('/') {
        Some((ns, name)) if mesh_model::is_dns_label(ns) && mesh_model::is_dns_label(name) => {
            Ok(ObjectKey::new(ns, name))
        }
        _ => Err(ExplainError::BadKey(s.to_owned())),
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
    if !config.workloads.contains_key(to) {
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
            let source = config
                .workloads
                .get(key)
                .ok_or_else(|| ExplainError::Unknown(key.clone()))?;
            let identity = source.identity(&config.mesh.trust_domain);
            let identity_uri = identity.to_string();
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
    Ok(Explanation {
        from: from_name,
        to: to.to_string(),
        port,
        source_identity,
        verdicts,
        selecting,
    })
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
        &e.verdicts[..1]
    } else {
        &e.verdicts[..]
    };
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

/// Asks a running control plane (its HTTP status address) for an explanation.
pub fn fetch(cp: SocketAddr, from: &Client, to: &str, port: u16) -> anyhow::Result<Explanation> {
    use anyhow::Context as _;
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&cp, timeout)
        .with_context(|| format!("cannot reach the control plane at {cp}"))?;
    stream.set_read_timeout(Some(timeout))?;
    // Keys are DNS labels and a slash, addresses are digits, dots and colons (all checked
    // before this), so they need no URL escaping.
    let from = match from {
        Client::Workload(key) => format!("from={key}"),
        Client::Address(ip) => format!("from_address={ip}"),
    };
    write!(
        stream,
        "GET /explain?{from}&to={to}&port={port} HTTP/1.1\r\nhost: {cp}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("no answer from the control plane at {cp}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{cp} did not answer HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        anyhow::bail!("{cp} answered {status}: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("{cp} sent an explanation I cannot read"))
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
}
