//! Access policies on the wire. Decoding re-checks what the model guarantees (rules have
//! clauses, lists entries, CIDRs are networks, port ranges are ranges).

use std::net::IpAddr;

use mesh_model::{
    authz::Selection,
    policy::{AccessPolicy, Cidr, CidrBlock, Clause, IdentityPattern, Matcher, PortRange, Rule},
    ObjectKey,
};

use super::{decode_enum, EnumError};
use crate::{ip_from_bytes, ip_to_bytes, v1};

/// What is wrong with a policy as received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {key}: {reason}")]
    Enum { key: ObjectKey, reason: EnumError },
    #[error("policy {key}: no rules")]
    NoRules { key: ObjectKey },
    #[error("policy {key}: selected workload {workload:?} is not ns/name")]
    Selected { key: ObjectKey, workload: String },
    #[error("policy {key} rule {rule}: {reason}")]
    Rule {
        key: ObjectKey,
        rule: usize,
        reason: RuleError,
    },
}

/// What is wrong with one rule of a policy as received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("no clauses")]
    NoClauses,
    #[error("a clause without a matcher")]
    NoMatcher,
    /// Names what the list holds: `identity`, `namespace`, `label`, `CIDR`, `port`.
    #[error("an empty {0} list")]
    EmptyList(&'static str),
    #[error("a CIDR address of {0} bytes")]
    CidrAddress(usize),
    #[error("a CIDR prefix too long")]
    CidrPrefix,
    #[error("{address}/{len} is not a network")]
    NotANetwork { address: IpAddr, len: u8 },
    #[error("a CIDR block without its CIDR")]
    NoCidr,
    #[error("{first}-{last} is not a port range")]
    PortRange { first: u32, last: u32 },
    /// The model's reason, as `IdentityPattern::parse` gives it.
    #[error("{0}")]
    Identity(String),
}

/// Leaves `selected` empty: which workloads depends on the node it goes to.
impl From<&AccessPolicy> for v1::AccessPolicy {
    fn from(p: &AccessPolicy) -> Self {
        v1::AccessPolicy {
            namespace: p.key.namespace.clone(),
            name: p.key.name.clone(),
            action: v1::PolicyAction::from(p.action).into(),
            mode: v1::PolicyMode::from(p.mode).into(),
            rules: p
                .rules
                .iter()
                .map(|r| v1::PolicyRule {
                    clauses: r.clauses.iter().map(v1::PolicyClause::from).collect(),
                })
                .collect(),
            selected: Vec::new(),
        }
    }
}

/// A policy as received, with the keys of the workloads it selects. The selector is resolved
/// by the control plane and does not travel: it comes back empty.
impl TryFrom<&v1::AccessPolicy> for Selection {
    type Error = PolicyError;

    fn try_from(p: &v1::AccessPolicy) -> Result<Self, PolicyError> {
        let key = ObjectKey::new(&p.namespace, &p.name);
        let enum_error = |reason| PolicyError::Enum {
            key: key.clone(),
            reason,
        };
        let mode = decode_enum::<v1::PolicyMode, _>(p.mode).map_err(enum_error)?;
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.iter().enumerate() {
            let rule_error = |reason| PolicyError::Rule {
                key: key.clone(),
                rule: i,
                reason,
            };
            let clauses = r
                .clauses
                .iter()
                .map(Clause::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(rule_error)?;
            if clauses.is_empty() {
                return Err(rule_error(RuleError::NoClauses));
            }
            rules.push(Rule { clauses });
        }
        if rules.is_empty() {
            return Err(PolicyError::NoRules { key });
        }
        let selected = p
            .selected
            .iter()
            .map(|s| {
                s.split_once('/')
                    .map(|(ns, name)| ObjectKey::new(ns, name))
                    .ok_or_else(|| PolicyError::Selected {
                        key: key.clone(),
                        workload: s.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let action = decode_enum::<v1::PolicyAction, _>(p.action).map_err(enum_error)?;
        let policy = AccessPolicy {
            key,
            selector: Default::default(),
            action,
            mode,
            rules,
        };
        Ok((policy, selected))
    }
}

impl From<&Clause> for v1::PolicyClause {
    fn from(c: &Clause) -> Self {
        use v1::policy_clause::Matcher as M;
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
                        cidr: Some(v1::Cidr::from(&b.cidr)),
                        except: b.except.iter().map(v1::Cidr::from).collect(),
                    })
                    .collect(),
            }),
            Matcher::Ports(ranges) => M::Ports(v1::PortRangeList {
                ranges: ranges.iter().map(v1::PortRange::from).collect(),
            }),
        };
        v1::PolicyClause {
            negated: c.negated,
            matcher: Some(matcher),
        }
    }
}

impl TryFrom<&v1::PolicyClause> for Clause {
    type Error = RuleError;

    fn try_from(c: &v1::PolicyClause) -> Result<Self, RuleError> {
        use v1::policy_clause::Matcher as M;
        let non_empty = |n: usize, what: &'static str| {
            if n == 0 {
                Err(RuleError::EmptyList(what))
            } else {
                Ok(())
            }
        };
        let matcher = match &c.matcher {
            None => return Err(RuleError::NoMatcher),
            Some(M::Identities(l)) => {
                non_empty(l.values.len(), "identity")?;
                Matcher::Identities(
                    l.values
                        .iter()
                        .map(|v| IdentityPattern::parse(v).map_err(RuleError::Identity))
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
                    let outer = Cidr::try_from(b.cidr.as_ref().ok_or(RuleError::NoCidr)?)?;
                    let except = b
                        .except
                        .iter()
                        .map(Cidr::try_from)
                        .collect::<Result<_, _>>()?;
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
                        .map(PortRange::try_from)
                        .collect::<Result<_, _>>()?,
                )
            }
        };
        Ok(Clause {
            negated: c.negated,
            matcher,
        })
    }
}

impl From<&Cidr> for v1::Cidr {
    fn from(c: &Cidr) -> Self {
        v1::Cidr {
            address: ip_to_bytes(c.address),
            prefix_len: c.prefix_len.into(),
        }
    }
}

/// Refuses host bits past the prefix, as the model does: the control plane never sends them.
impl TryFrom<&v1::Cidr> for Cidr {
    type Error = RuleError;

    fn try_from(c: &v1::Cidr) -> Result<Self, RuleError> {
        let address = ip_from_bytes(&c.address).ok_or(RuleError::CidrAddress(c.address.len()))?;
        let len = u8::try_from(c.prefix_len).map_err(|_| RuleError::CidrPrefix)?;
        Cidr::new(address, len)
            .filter(|n| n.address == address)
            .ok_or(RuleError::NotANetwork { address, len })
    }
}

impl From<&PortRange> for v1::PortRange {
    fn from(r: &PortRange) -> Self {
        v1::PortRange {
            first: r.first.into(),
            last: r.last.into(),
        }
    }
}

impl TryFrom<&v1::PortRange> for PortRange {
    type Error = RuleError;

    fn try_from(r: &v1::PortRange) -> Result<Self, RuleError> {
        u16::try_from(r.first)
            .ok()
            .zip(u16::try_from(r.last).ok())
            .and_then(|(f, l)| PortRange::new(f, l))
            .ok_or(RuleError::PortRange {
                first: r.first,
                last: r.last,
            })
    }
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
        let wire = v1::AccessPolicy {
            selected: vec!["shop/pay".into()],
            ..policy.into()
        };
        let (back, selected) = Selection::try_from(&wire).unwrap();
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

    /// A well-formed policy: Allow, one rule, ports 1-2.
    fn allows_ports_1_to_2() -> v1::AccessPolicy {
        v1::AccessPolicy {
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
        }
    }

    #[test]
    fn malformed_policies_are_refused() {
        let good = allows_ports_1_to_2;
        assert!(Selection::try_from(&good()).is_ok());
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
            assert!(Selection::try_from(&bad).is_err(), "{bad:?}");
        }
    }

    // The reasons nodes report in their NACKs and logs, word for word as before they were
    // typed.
    #[test]
    fn refusals_name_the_policy_rule_and_value() {
        let changed = |f: fn(&mut v1::AccessPolicy)| {
            let mut p = allows_ports_1_to_2();
            f(&mut p);
            p
        };
        fn cidr(address: Vec<u8>, prefix_len: u32) -> Option<v1::policy_clause::Matcher> {
            Some(v1::policy_clause::Matcher::Cidrs(v1::CidrList {
                blocks: vec![v1::CidrBlock {
                    cidr: Some(v1::Cidr {
                        address,
                        prefix_len,
                    }),
                    except: vec![],
                }],
            }))
        }
        let cases = [
            (
                changed(|p| p.action = 0),
                "policy a/p: policy action 0 is neither Allow nor Deny",
            ),
            (changed(|p| p.mode = 7), "policy a/p: unknown mode 7"),
            (changed(|p| p.rules.clear()), "policy a/p: no rules"),
            (
                changed(|p| p.rules[0].clauses.clear()),
                "policy a/p rule 0: no clauses",
            ),
            (
                changed(|p| p.selected = vec!["b".into()]),
                "policy a/p: selected workload \"b\" is not ns/name",
            ),
            (
                changed(|p| p.rules[0].clauses[0].matcher = cidr(vec![10, 0, 0, 1], 8)),
                "policy a/p rule 0: 10.0.0.1/8 is not a network",
            ),
            (
                changed(|p| p.rules[0].clauses[0].matcher = cidr(vec![10, 0, 0], 8)),
                "policy a/p rule 0: a CIDR address of 3 bytes",
            ),
            (
                changed(|p| p.rules[0].clauses[0].matcher = None),
                "policy a/p rule 0: a clause without a matcher",
            ),
        ];
        for (policy, want) in cases {
            assert_eq!(Selection::try_from(&policy).unwrap_err().to_string(), want);
        }
    }
}
