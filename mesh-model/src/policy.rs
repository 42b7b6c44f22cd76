//! Validated `AccessPolicy`: what the control plane compiles and ships and what nodes evaluate.
//!
//! Every list clause of a rule becomes one [`Clause`] (matcher plus negation), so evaluation
//! never looks at the YAML shape again. Validation errors name the field, on one line.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;

use crate::{
    object_key::ObjectKey,
    spec::{AccessPolicySpec, CidrSpec, PortSpec, RuleSpec},
    validate::{check_label, check_labels},
    Action, Mode, SpiffeId,
};

/// A validated access policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessPolicy {
    pub key: ObjectKey,
    /// Labels a destination workload must all carry; empty selects the whole namespace.
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub mode: Mode,
    pub rules: Vec<Rule>,
}

impl AccessPolicy {
    /// Whether `w` carries the selector's labels. Where the policy applies (its namespace, or
    /// the mesh from the root namespace) is the config's to say: [`crate::Config::selected_by`].
    pub fn selects(&self, w: &crate::Workload) -> bool {
        w.has_labels(&self.selector)
    }
}

/// Clauses that must all match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clause {
    /// The `not…` form: matches when the matcher does not.
    pub negated: bool,
    pub matcher: Matcher,
}

/// What one clause tests. A list matches when any entry does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Matcher {
    Identities(Vec<IdentityPattern>),
    Namespaces(Vec<String>),
    /// The client workload carries all of these.
    Labels(BTreeMap<String, String>),
    Cidrs(Vec<CidrBlock>),
    Ports(Vec<PortRange>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum IdentityPattern {
    Exact(String),
    /// Written with a trailing `*`; holds the text before it.
    Prefix(String),
}

impl IdentityPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err(format!(
                "{text:?}: '*' is allowed only at the end of a pattern"
            )),
            Some(prefix) if !prefix.is_empty() && !prefix.starts_with("spiffe://") => {
                Err(format!("{text:?} is not a SPIFFE ID prefix (spiffe://…)"))
            }
            Some(prefix) => Ok(Self::Prefix(prefix.to_owned())),
            None => text
                .parse::<SpiffeId>()
                .map(|id| Self::Exact(id.to_string()))
                .map_err(|e| e.to_string()),
        }
    }

    pub fn matches(&self, id: &str) -> bool {
        match self {
            Self::Exact(e) => e == id,
            Self::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(e) => f.write_str(e),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// An IP network: the address has no bits set past `prefix_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::/n`, or one address (a /32 or /128).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR (address/prefix-length)"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        let cidr = Self::new(address, prefix_len)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?;
        if cidr.address != address {
            return Err(format!(
                "{text:?} has bits set past the prefix; did you mean {cidr}?"
            ));
        }
        Ok(cidr)
    }

    /// The network of `address` with `prefix_len` bits (host bits cleared), if the length fits
    /// the family.
    pub fn new(address: IpAddr, prefix_len: u8) -> Option<Self> {
        let address = match address {
            IpAddr::V4(a) if prefix_len <= 32 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix_len <= 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self {
            address,
            prefix_len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Self::new(ip, self.prefix_len).is_some_and(|n| n.address == self.address)
            }
            _ => false,
        }
    }

    /// True when every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.address)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CidrBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

impl CidrBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// Inclusive, `first <= last`, both at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first >= 1 && first <= last).then_some(Self { first, last })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Keys that look like L7 (HTTP) matching. They are named in the error instead of being reported
/// as merely unknown, because a policy that silently matched less than its author meant would
/// allow or deny the wrong traffic.
const L7_FIELDS: &[&str] = &[
    "methods",
    "notMethods",
    "paths",
    "notPaths",
    "hosts",
    "notHosts",
    "headers",
    "http",
    "grpc",
    "requestPrincipals",
    "notRequestPrincipals",
    "when",
    "to",
    "operation",
];

/// Rejects L7-looking keys in the raw spec before the typed parse, naming the field.
pub(crate) fn reject_l7_fields(spec: &serde_yaml::Value) -> Result<(), String> {
    let l7 = |map: &serde_yaml::Mapping, at: &str| -> Result<(), String> {
        for key in map.keys().filter_map(|k| k.as_str()) {
            if L7_FIELDS.contains(&key) {
                return Err(format!(
                    "{at}.{key}: L7 (HTTP) matching is not supported; AccessPolicy matches identities, namespaces, labels, CIDRs and ports"
                ));
            }
        }
        Ok(())
    };
    if let Some(map) = spec.as_mapping() {
        l7(map, "spec")?;
        if let Some(rules) = map.get("rules").and_then(|r| r.as_sequence()) {
            for (i, rule) in rules.iter().enumerate() {
                if let Some(rule) = rule.as_mapping() {
                    l7(rule, &format!("spec.rules[{i}]"))?;
                }
            }
        }
    }
    Ok(())
}

/// Validates a spec into a policy named `key`.
pub fn validate(key: ObjectKey, spec: AccessPolicySpec) -> Result<AccessPolicy, String> {
    let selector = spec.selector.unwrap_or_default().match_labels;
    check_labels("spec.selector.matchLabels", &selector)?;
    if spec.rules.is_empty() {
        return Err(
            "spec.rules: at least one rule is required (to match every connection, use ports: [\"1-65535\"])"
                .into(),
        );
    }
    let rules = spec
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| rule(&format!("spec.rules[{i}]"), r))
        .collect::<Result<_, _>>()?;
    Ok(AccessPolicy {
        key,
        selector,
        action: spec.action,
        mode: spec.mode,
        rules,
    })
}

pub(crate) fn rule(at: &str, r: RuleSpec) -> Result<Rule, String> {
    let mut clauses = Vec::new();
    let mut add = |negated: bool, field: &str, m: Option<Result<Matcher, String>>| {
        if let Some(m) = m {
            let matcher = m.map_err(|e| format!("{at}.{field}{e}"))?;
            clauses.push(Clause { negated, matcher });
        }
        Ok::<_, String>(())
    };
    add(
        false,
        "sourceIdentities",
        r.source_identities.map(identities),
    )?;
    add(
        true,
        "notSourceIdentities",
        r.not_source_identities.map(identities),
    )?;
    add(
        false,
        "sourceNamespaces",
        r.source_namespaces.map(namespaces),
    )?;
    add(
        true,
        "notSourceNamespaces",
        r.not_source_namespaces.map(namespaces),
    )?;
    add(false, "sourceLabels", r.source_labels.map(labels))?;
    add(true, "notSourceLabels", r.not_source_labels.map(labels))?;
    add(false, "sourceCidrs", r.source_cidrs.map(cidrs))?;
    add(true, "notSourceCidrs", r.not_source_cidrs.map(cidrs))?;
    add(false, "ports", r.ports.map(ports))?;
    add(true, "notPorts", r.not_ports.map(ports))?;
    if clauses.is_empty() {
        return Err(format!(
            "{at}: an empty rule; name at least one of sourceIdentities, sourceNamespaces, sourceLabels, sourceCidrs, ports (or their not… forms)"
        ));
    }
    Ok(Rule { clauses })
}

// The matcher builders return errors that start right after the field name: `[i]: …` or `: …`.

fn non_empty<T>(list: &[T]) -> Result<(), String> {
    if list.is_empty() {
        Err(": an empty list matches nothing; remove the field or add entries".into())
    } else {
        Ok(())
    }
}

fn identities(list: Vec<String>) -> Result<Matcher, String> {
    non_empty(&list)?;
    list.iter()
        .enumerate()
        .map(|(i, t)| IdentityPattern::parse(t).map_err(|e| format!("[{i}]: {e}")))
        .collect::<Result<_, _>>()
        .map(Matcher::Identities)
}

fn namespaces(list: Vec<String>) -> Result<Matcher, String> {
    non_empty(&list)?;
    for (i, ns) in list.iter().enumerate() {
        check_label("", ns).map_err(|e| format!("[{i}]{e}"))?;
    }
    Ok(Matcher::Namespaces(list))
}

fn labels(map: BTreeMap<String, String>) -> Result<Matcher, String> {
    if map.is_empty() {
        return Err(": an empty label set; remove the field or name a label".into());
    }
    check_labels("", &map)?;
    Ok(Matcher::Labels(map))
}

fn cidrs(list: Vec<CidrSpec>) -> Result<Matcher, String> {
    non_empty(&list)?;
    let mut out = Vec::new();
    for (i, c) in list.into_iter().enumerate() {
        let cidr = Cidr::parse(&c.cidr).map_err(|e| format!("[{i}].cidr: {e}"))?;
        let mut except = Vec::new();
        for (j, e) in c.except.iter().enumerate() {
            let e = Cidr::parse(e).map_err(|err| format!("[{i}].except[{j}]: {err}"))?;
            if !cidr.covers(&e) {
                return Err(format!("[{i}].except[{j}]: {e} is not inside {cidr}"));
            }
            except.push(e);
        }
        out.push(CidrBlock { cidr, except });
    }
    Ok(Matcher::Cidrs(out))
}

fn ports(list: Vec<PortSpec>) -> Result<Matcher, String> {
    port_ranges(list).map(Matcher::Ports)
}

/// A non-empty list of ports and ranges; errors start right after the field name.
pub(crate) fn port_ranges(list: Vec<PortSpec>) -> Result<Vec<PortRange>, String> {
    non_empty(&list)?;
    list.iter()
        .enumerate()
        .map(|(i, p)| port_range(p).map_err(|e| format!("[{i}]: {e}")))
        .collect()
}

fn port_range(p: &PortSpec) -> Result<PortRange, String> {
    let port = |n: u64| {
        u16::try_from(n)
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| format!("{n} is not a port (1-65535)"))
    };
    let (first, last) = match p {
        PortSpec::Number(n) => (port(*n)?, port(*n)?),
        PortSpec::Text(t) => {
            let num = |s: &str| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{t:?} is not a port or a first-last range"))
                    .and_then(port)
            };
            match t.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(t)?, num(t)?),
            }
        }
    };
    PortRange::new(first, last).ok_or_else(|| format!("{first}-{last}: the range is backwards"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        assert_eq!(Cidr::parse("10.0.0.7").unwrap().prefix_len, 32);
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        for bad in [
            "10.0.0.1/33",
            "10.0.0.0/x",
            "10.0.0.1/24",
            "nope",
            "fd00::/129",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(Cidr::parse("10.0.0.1/24")
            .unwrap_err()
            .contains("10.0.0.0/24"));
    }

    #[test]
    fn port_ranges_parse() {
        let r = |p: PortSpec| port_range(&p);
        assert_eq!(
            r(PortSpec::Number(80)).unwrap(),
            PortRange::new(80, 80).unwrap()
        );
        assert_eq!(
            r(PortSpec::Text("9000-9100".into())).unwrap(),
            PortRange::new(9000, 9100).unwrap()
        );
        for bad in [
            PortSpec::Number(0),
            PortSpec::Number(70000),
            PortSpec::Text("20-10".into()),
            PortSpec::Text("1-".into()),
            PortSpec::Text("http".into()),
        ] {
            assert!(r(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_patterns() {
        let p = IdentityPattern::parse("spiffe://td/ns/shop/*").unwrap();
        assert!(p.matches("spiffe://td/ns/shop/sa/a"));
        assert!(!p.matches("spiffe://td/ns/shopping/sa/a"));
        assert!(IdentityPattern::parse("*").is_ok());
        assert!(IdentityPattern::parse("spiffe://td/ns/*/sa/x").is_err());
        assert!(IdentityPattern::parse("td/ns/a").is_err());
        assert!(IdentityPattern::parse("spiffe://td/ns/a/sa/b").is_ok());
    }
}
