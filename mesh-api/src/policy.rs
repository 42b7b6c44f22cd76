//! Access policies on the wire: the validated model into its protobuf form (control plane) and
//! back (node). Decoding re-checks what the model guarantees, so a node never evaluates a policy
//! that the control plane could not have produced.

use mesh_model::{
    policy::{AccessPolicy, Cidr, CidrBlock, Clause, IdentityPattern, Matcher, PortRange, Rule},
    Action, Mode, MtlsMode, ObjectKey, Transport,
};

use crate::{ip_from_bytes, ip_to_bytes, v1};

pub fn action_to_proto(a: Action) -> v1::PolicyAction {
    match a {
        Action::Allow => v1::PolicyAction::Allow,
        Action::Deny => v1::PolicyAction::Deny,
    }
}

pub fn action_from_proto(a: i32) -> Result<Action, String> {
    match v1::PolicyAction::try_from(a) {
        Ok(v1::PolicyAction::Allow) => Ok(Action::Allow),
        Ok(v1::PolicyAction::Deny) => Ok(Action::Deny),
        _ => Err(format!("policy action {a} is neither Allow nor Deny")),
    }
}

pub fn mtls_to_proto(m: MtlsMode) -> v1::MtlsMode {
    match m {
        MtlsMode::Permissive => v1::MtlsMode::Permissive,
        MtlsMode::Strict => v1::MtlsMode::Strict,
    }
}

pub fn mtls_from_proto(m: i32) -> Result<MtlsMode, String> {
    match v1::MtlsMode::try_from(m) {
        Ok(v1::MtlsMode::Permissive) => Ok(MtlsMode::Permissive),
        Ok(v1::MtlsMode::Strict) => Ok(MtlsMode::Strict),
        _ => Err(format!("mTLS mode {m} is neither PERMISSIVE nor STRICT")),
    }
}

pub fn transport_to_proto(t: Transport) -> v1::Transport {
    match t {
        Transport::Tls => v1::Transport::Tls,
        Transport::Quic => v1::Transport::Quic,
    }
}

/// UNSPECIFIED comes from a control plane older than the QUIC transport: TLS, as it was then.
pub fn transport_from_proto(t: i32) -> Result<Transport, String> {
    match v1::Transport::try_from(t) {
        Ok(v1::Transport::Unspecified | v1::Transport::Tls) => Ok(Transport::Tls),
        Ok(v1::Transport::Quic) => Ok(Transport::Quic),
        Err(_) => Err(format!("transport {t} is neither TLS nor QUIC")),
    }
}

/// The policy for a node, with the keys of that node's workloads it selects.
pub fn to_proto(p: &AccessPolicy, selected: Vec<String>) -> v1::AccessPolicy {
    v1::AccessPolicy {
        namespace: p.key.namespace.clone(),
        name: p.key.name.clone(),
        action: action_to_proto(p.action).into(),
        mode: match p.mode {
            Mode::Enforce => v1::PolicyMode::Enforce,
            Mode::DryRun => v1::PolicyMode::DryRun,
        }
        .into(),
        rules: p
            .rules
            .iter()
            .map(|r| v1::PolicyRule {
                clauses: r.clauses.iter().map(clause_to_proto).collect(),
            })
            .collect(),
        selected,
    }
}

fn clause_to_proto(c: &Clause) -> v1::PolicyClause {
    use v1::policy_clause::Matcher as M;
    let cidr = |c: &Cidr| v1::Cidr {
        address: ip_to_bytes(c.address),
        prefix_len: c.prefix_len.into(),
    };
    let matcher = match &c.matcher {
        Matcher::Identities(ids) => M::Identities(v1::StringList {
            values: ids.iter().map(ToString::to_string).collect(),
        }),
        Matcher::Namespaces(ns) => M::Namespaces(v1::StringList { values: ns.clone() }),
        Matcher::Labels(l) => M::Labels(v1::Labels {
            labels: l.clone().into_iter().collect(),
        }),
        Matcher::Cidrs(blocks) => M::Cidrs(v1::CidrList {
            blocks: blocks
                .iter()
                .map(|b| v1::CidrBlock {
                    cidr: Some(cidr(&b.cidr)),
                    except: b.except.iter().map(cidr).collect(),
                })
                .collect(),
        }),
        Matcher::Ports(ranges) => M::Ports(v1::PortRangeList {
            ranges: ranges
                .iter()
                .map(|r| v1::PortRange {
                    first: r.first.into(),
                    last: r.last.into(),
                })
                .collect(),
        }),
    };
    v1::PolicyClause {
        negated: c.negated,
        matcher: Some(matcher),
    }
}

/// A policy as received, and the keys of the workloads it selects; or what is wrong with it.
pub fn from_proto(p: &v1::AccessPolicy) -> Result<(AccessPolicy, Vec<ObjectKey>), String> {
    let key = ObjectKey::new(&p.namespace, &p.name);
    let mode = match v1::PolicyMode::try_from(p.mode) {
        Ok(v1::PolicyMode::Enforce) => Mode::Enforce,
        Ok(v1::PolicyMode::DryRun) => Mode::DryRun,
        Err(_) => return Err(format!("policy {key}: unknown mode {}", p.mode)),
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let clauses = r
            .clauses
            .iter()
            .map(clause_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("policy {key} rule {i}: {e}"))?;
        if clauses.is_empty() {
            return Err(format!("policy {key} rule {i}: no clauses"));
        }
        rules.push(Rule { clauses });
    }
    if rules.is_empty() {
        return Err(format!("policy {key}: no rules"));
    }
    let selected = p
        .selected
        .iter()
        .map(|s| {
            s.split_once('/')
                .map(|(ns, name)| ObjectKey::new(ns, name))
                .ok_or_else(|| format!("policy {key}: selected workload {s:?} is not ns/name"))
        })
        .collect::<Result<_, _>>()?;
    let policy = AccessPolicy {
        key: key.clone(),
        selector: Default::default(),
        action: action_from_proto(p.action).map_err(|e| format!("policy {key}: {e}"))?,
        mode,
        rules,
    };
    Ok((policy, selected))
}

fn clause_from_proto(c: &v1::PolicyClause) -> Result<Clause, String> {
    use v1::policy_clause::Matcher as M;
    let non_empty = |n: usize, what: &str| {
        if n == 0 {
            Err(format!("an empty {what} list"))
        } else {
            Ok(())
        }
    };
    let cidr = |c: &v1::Cidr| {
        let address = ip_from_bytes(&c.address)
            .ok_or_else(|| format!("a CIDR address of {} bytes", c.address.len()))?;
        let len = u8::try_from(c.prefix_len).map_err(|_| "a CIDR prefix too long".to_owned())?;
        Cidr::new(address, len)
            .filter(|n| n.address == address)
            .ok_or_else(|| format!("{address}/{len} is not a network"))
    };
    let matcher = match &c.matcher {
        None => return Err("a clause without a matcher".into()),
        Some(M::Identities(l)) => {
            non_empty(l.values.len(), "identity")?;
            Matcher::Identities(
                l.values
                    .iter()
                    .map(|v| IdentityPattern::parse(v))
                    .collect::<Result<_, _>>()?,
            )
        }
        Some(M::Namespaces(l)) => {
            non_empty(l.values.len(), "namespace")?;
            Matcher::Namespaces(l.values.clone())
        }
        Some(M::Labels(l)) => {
            non_empty(l.labels.len(), "label")?;
            Matcher::Labels(l.labels.clone().into_iter().collect())
        }
        Some(M::Cidrs(l)) => {
            non_empty(l.blocks.len(), "CIDR")?;
            let mut blocks = Vec::with_capacity(l.blocks.len());
            for b in &l.blocks {
                let outer = cidr(b.cidr.as_ref().ok_or("a CIDR block without its CIDR")?)?;
                let except = b.except.iter().map(cidr).collect::<Result<_, _>>()?;
                blocks.push(CidrBlock {
                    cidr: outer,
                    except,
                });
            }
            Matcher::Cidrs(blocks)
        }
        Some(M::Ports(l)) => {
            non_empty(l.ranges.len(), "port")?;
            Matcher::Ports(
                l.ranges
                    .iter()
                    .map(|r| {
                        u16::try_from(r.first)
                            .ok()
                            .zip(u16::try_from(r.last).ok())
                            .and_then(|(f, l)| PortRange::new(f, l))
                            .ok_or_else(|| format!("{}-{} is not a port range", r.first, r.last))
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
    };
    Ok(Clause {
        negated: c.negated,
        matcher,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn policies_round_trip() {
        let text = "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: Deny\n  mode: DryRun\n  rules:\n  - {sourceIdentities: ['spiffe://td/ns/a/sa/b', 'spiffe://td/ns/c/*'], notSourceNamespaces: [x]}\n  - {sourceLabels: {app: a}, sourceCidrs: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}, {cidr: 'fd00::/64'}], ports: [80, '90-99'], notPorts: [95]}\n";
        let config = mesh_model::parse(&[(PathBuf::from("p.yaml"), text.into())]).unwrap();
        let policy = config.policies.values().next().unwrap();
        let wire = to_proto(policy, vec!["shop/pay".into()]);
        let (back, selected) = from_proto(&wire).unwrap();
        assert_eq!(selected, [ObjectKey::new("shop", "pay")]);
        // The selector is resolved by the control plane and does not travel.
        assert_eq!(
            back,
            AccessPolicy {
                selector: Default::default(),
                ..policy.clone()
            }
        );
    }

    #[test]
    fn malformed_policies_are_refused() {
        let good = || v1::AccessPolicy {
            namespace: "a".into(),
            name: "p".into(),
            action: v1::PolicyAction::Allow.into(),
            mode: 0,
            rules: vec![v1::PolicyRule {
                clauses: vec![v1::PolicyClause {
                    negated: false,
                    matcher: Some(v1::policy_clause::Matcher::Ports(v1::PortRangeList {
                        ranges: vec![v1::PortRange { first: 1, last: 2 }],
                    })),
                }],
            }],
            selected: vec![],
        };
        assert!(from_proto(&good()).is_ok());
        let mut no_action = good();
        no_action.action = 0;
        let mut no_rules = good();
        no_rules.rules.clear();
        let mut bad_range = good();
        bad_range.rules[0].clauses[0].matcher =
            Some(v1::policy_clause::Matcher::Ports(v1::PortRangeList {
                ranges: vec![v1::PortRange {
                    first: 9,
                    last: 70000,
                }],
            }));
        let mut host_bits = good();
        host_bits.rules[0].clauses[0].matcher =
            Some(v1::policy_clause::Matcher::Cidrs(v1::CidrList {
                blocks: vec![v1::CidrBlock {
                    cidr: Some(v1::Cidr {
                        address: vec![10, 0, 0, 1],
                        prefix_len: 8,
                    }),
                    except: vec![],
                }],
            }));
        for bad in [no_action, no_rules, bad_range, host_bits] {
            assert!(from_proto(&bad).is_err(), "{bad:?}");
        }
    }
}
