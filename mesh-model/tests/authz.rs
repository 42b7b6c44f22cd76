//! The policy index against the plain-scan reference, and the evaluation rules case by case.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_model::{
    authz::{linear, DecidedBy, PolicyIndex, Selection, Source, SourceWorkload},
    policy::{AccessPolicy, Cidr, CidrBlock, Clause, IdentityPattern, Matcher, PortRange, Rule},
    Action, Mode, ObjectKey,
};
use proptest::prelude::*;

const NAMESPACES: [&str; 3] = ["a", "b", "c"];

fn workloads() -> Vec<ObjectKey> {
    ["a/w0", "a/w1", "b/w2", "c/w3"]
        .iter()
        .map(|k| {
            let (ns, name) = k.split_once('/').unwrap();
            ObjectKey::new(ns, name)
        })
        .collect()
}

fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://td/ns/{ns}/sa/{sa}")
}

fn labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["app", "tier"]).prop_map(String::from),
        prop::sample::select(vec!["x", "y"]).prop_map(String::from),
        0..=2,
    )
}

fn address_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..8).prop_map(|l| IpAddr::from([10, 0, 0, l])),
        (0u8..8).prop_map(|l| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(l)])),
    ]
}

fn cidr_strategy() -> impl Strategy<Value = Cidr> {
    (address_strategy(), 0u8..=3).prop_map(|(a, shrink)| {
        let len = if a.is_ipv4() { 32 } else { 128 } - shrink;
        Cidr::new(a, len).unwrap()
    })
}

fn matcher_strategy() -> impl Strategy<Value = Matcher> {
    let ns = prop::sample::select(NAMESPACES.to_vec());
    let sa = prop::sample::select(vec!["s0", "s1"]);
    let pattern = prop_oneof![
        (ns.clone(), sa).prop_map(|(n, s)| IdentityPattern::Exact(identity(n, s))),
        ns.clone()
            .prop_map(|n| IdentityPattern::Prefix(format!("spiffe://td/ns/{n}/"))),
        Just(IdentityPattern::Prefix(String::new())),
    ];
    let block = (cidr_strategy(), prop::collection::vec(0u8..=2, 0..=1)).prop_map(|(cidr, ex)| {
        let except = ex
            .into_iter()
            .map(|d| {
                Cidr::new(
                    cidr.address,
                    (cidr.prefix_len + d).min(if cidr.address.is_ipv4() { 32 } else { 128 }),
                )
                .unwrap()
            })
            .collect();
        CidrBlock { cidr, except }
    });
    let range = (1u16..12, 0u16..3).prop_map(|(f, w)| PortRange::new(f, f + w).unwrap());
    prop_oneof![
        prop::collection::vec(pattern, 1..3).prop_map(Matcher::Identities),
        prop::collection::vec(ns.prop_map(String::from), 1..3).prop_map(Matcher::Namespaces),
        labels_strategy()
            .prop_filter("non-empty", |l| !l.is_empty())
            .prop_map(Matcher::Labels),
        prop::collection::vec(block, 1..3).prop_map(Matcher::Cidrs),
        prop::collection::vec(range, 1..3).prop_map(Matcher::Ports),
    ]
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    prop::collection::vec(
        (any::<bool>(), matcher_strategy())
            .prop_map(|(negated, matcher)| Clause { negated, matcher }),
        1..4,
    )
    .prop_map(|clauses| Rule { clauses })
}

fn selection_strategy(index: usize) -> impl Strategy<Value = Selection> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        prop_oneof![3 => Just(Mode::Enforce), 1 => Just(Mode::DryRun)],
        prop::collection::vec(rule_strategy(), 1..4),
        prop::sample::subsequence(workloads(), 0..=4),
    )
        .prop_map(move |(ns, action, mode, rules, selected)| {
            let policy = AccessPolicy {
                key: ObjectKey::new(ns, &format!("p{index}")),
                selector: BTreeMap::new(),
                action,
                mode,
                rules,
            };
            (policy, selected)
        })
}

fn selections_strategy() -> impl Strategy<Value = Vec<Selection>> {
    (0usize..7).prop_flat_map(|n| (0..n).map(selection_strategy).collect::<Vec<_>>())
}

#[derive(Debug, Clone)]
struct Client {
    address: IpAddr,
    workload: Option<(String, String, BTreeMap<String, String>)>,
}

impl Client {
    fn source(&self) -> Source<'_> {
        Source {
            address: self.address,
            workload: self
                .workload
                .as_ref()
                .map(|(id, ns, labels)| SourceWorkload {
                    identity: id,
                    namespace: ns,
                    labels,
                }),
        }
    }
}

fn client_strategy() -> impl Strategy<Value = Client> {
    let workload = (
        prop::sample::select(NAMESPACES.to_vec()),
        prop::sample::select(vec!["s0", "s1"]),
        labels_strategy(),
    )
        .prop_map(|(ns, sa, labels)| (identity(ns, sa), ns.to_owned(), labels));
    (address_strategy(), prop::option::weighted(0.8, workload))
        .prop_map(|(address, workload)| Client { address, workload })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn index_agrees_with_the_linear_reference(
        selections in selections_strategy(),
        default_allow in any::<bool>(),
        client in client_strategy(),
        dest in prop::sample::select(workloads()),
        port in 1u16..16,
    ) {
        let default = if default_allow { Action::Allow } else { Action::Deny };
        let index = PolicyIndex::new(default, selections.clone());
        let src = client.source();
        prop_assert_eq!(
            index.evaluate(&dest, port, &src),
            linear::evaluate(default, &selections, &dest, port, &src)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The ports the fast-deny set is built from are exactly the ports the destination denies:
    /// never more (that would refuse an allowed connection at the source), and, where the
    /// generated rules can tell ports apart (1 to 20) and beyond them, not fewer.
    #[test]
    fn denied_ports_are_exactly_what_the_destination_denies(
        selections in selections_strategy(),
        default_allow in any::<bool>(),
        client in client_strategy(),
        dest in prop::sample::select(workloads()),
    ) {
        let default = if default_allow { Action::Allow } else { Action::Deny };
        let index = PolicyIndex::new(default, selections.clone());
        let src = client.source();
        let ranges = index.denied_ports(&dest, &src);
        let denies = |port: u16| !linear::evaluate(default, &selections, &dest, port, &src).allowed;
        for r in &ranges {
            for port in [r.first, r.last, r.first + (r.last - r.first) / 2] {
                prop_assert!(denies(port), "{port} in {r:?} is not denied by the destination");
            }
        }
        for port in (1..=20).chain([100, 65_535]) {
            prop_assert_eq!(ranges.iter().any(|r| r.contains(port)), denies(port), "port {}", port);
        }
    }
}

// ---- the rules, one case at a time ----

fn key(s: &str) -> ObjectKey {
    let (ns, name) = s.split_once('/').unwrap();
    ObjectKey::new(ns, name)
}

fn policy(
    name: &str,
    action: Action,
    mode: Mode,
    rules: Vec<Vec<(bool, Matcher)>>,
) -> AccessPolicy {
    AccessPolicy {
        key: key(name),
        selector: BTreeMap::new(),
        action,
        mode,
        rules: rules
            .into_iter()
            .map(|clauses| Rule {
                clauses: clauses
                    .into_iter()
                    .map(|(negated, matcher)| Clause { negated, matcher })
                    .collect(),
            })
            .collect(),
    }
}

fn payment() -> ObjectKey {
    key("shop/payment")
}

struct Case {
    order_labels: BTreeMap<String, String>,
}

impl Case {
    fn new() -> Self {
        Self {
            order_labels: BTreeMap::from([("app".to_owned(), "order".to_owned())]),
        }
    }

    fn order(&self) -> Source<'_> {
        Source {
            address: IpAddr::from([10, 0, 1, 2]),
            workload: Some(SourceWorkload {
                identity: "spiffe://td/ns/shop/sa/order",
                namespace: "shop",
                labels: &self.order_labels,
            }),
        }
    }

    fn plaintext(&self) -> Source<'_> {
        Source {
            address: IpAddr::from([192, 168, 9, 9]),
            workload: None,
        }
    }
}

fn allow_only(m: Matcher, negated: bool) -> PolicyIndex {
    let p = policy(
        "shop/only",
        Action::Allow,
        Mode::Enforce,
        vec![vec![(negated, m)]],
    );
    PolicyIndex::new(Action::Allow, [(p, vec![payment()])])
}

#[test]
fn each_matcher_alone_and_negated() {
    let c = Case::new();
    let cidr = |s: &str| Cidr::parse(s).unwrap();
    let matchers = [
        Matcher::Identities(vec![IdentityPattern::Exact(
            "spiffe://td/ns/shop/sa/order".into(),
        )]),
        Matcher::Identities(vec![IdentityPattern::Prefix("spiffe://td/ns/shop/".into())]),
        Matcher::Namespaces(vec!["shop".into()]),
        Matcher::Labels(BTreeMap::from([("app".into(), "order".into())])),
        Matcher::Cidrs(vec![CidrBlock {
            cidr: cidr("10.0.0.0/16"),
            except: vec![],
        }]),
        Matcher::Ports(vec![PortRange::new(8000, 8100).unwrap()]),
    ];
    for m in matchers {
        let allows = |negated: bool, src: &Source<'_>, port: u16| {
            allow_only(m.clone(), negated)
                .evaluate(&payment(), port, src)
                .allowed
        };
        assert!(
            allows(false, &c.order(), 8080),
            "{m:?} should match order:8080"
        );
        assert!(
            !allows(true, &c.order(), 8080),
            "not {m:?} should not match order:8080"
        );
        // A client or port that the matcher does not describe.
        let (other, port) = match &m {
            Matcher::Ports(_) => (c.order(), 9999),
            _ => (c.plaintext(), 8080),
        };
        assert!(!allows(false, &other, port), "{m:?} should not match");
        assert!(allows(true, &other, port), "not {m:?} should match");
    }
    // A CIDR with an exception.
    let block = Matcher::Cidrs(vec![CidrBlock {
        cidr: cidr("10.0.0.0/16"),
        except: vec![cidr("10.0.1.0/24")],
    }]);
    assert!(
        !allow_only(block, false)
            .evaluate(&payment(), 8080, &c.order())
            .allowed
    );
}

#[test]
fn deny_beats_allow_and_defaults_apply() {
    let c = Case::new();
    let ns = || Matcher::Namespaces(vec!["shop".into()]);
    let allow = policy(
        "shop/a-allow",
        Action::Allow,
        Mode::Enforce,
        vec![vec![(false, ns())]],
    );
    let deny = policy(
        "shop/z-deny",
        Action::Deny,
        Mode::Enforce,
        vec![vec![(false, ns())]],
    );
    let both = PolicyIndex::new(
        Action::Allow,
        [(allow.clone(), vec![payment()]), (deny, vec![payment()])],
    );
    let d = both.evaluate(&payment(), 8080, &c.order());
    assert!(!d.allowed);
    assert!(
        matches!(&d.decided_by, DecidedBy::Rule(h) if h.policy == key("shop/z-deny") && h.rule == 0)
    );

    // An Allow that selects the workload but does not match: denied even with default Allow.
    let only = PolicyIndex::new(Action::Allow, [(allow, vec![payment()])]);
    let d = only.evaluate(&payment(), 8080, &c.plaintext());
    assert_eq!(
        (d.allowed, d.decided_by),
        (false, DecidedBy::NoAllowMatched)
    );

    // Nothing selects the workload: the default decides, both ways.
    for (default, allowed) in [(Action::Allow, true), (Action::Deny, false)] {
        let d = PolicyIndex::new(default, []).evaluate(&payment(), 8080, &c.order());
        assert_eq!((d.allowed, d.decided_by), (allowed, DecidedBy::Default));
    }
}

#[test]
fn dry_run_reports_but_never_decides() {
    let c = Case::new();
    let dry = policy(
        "shop/dry",
        Action::Deny,
        Mode::DryRun,
        vec![
            vec![(false, Matcher::Ports(vec![PortRange::new(1, 10).unwrap()]))],
            vec![(false, Matcher::Namespaces(vec!["shop".into()]))],
        ],
    );
    let index = PolicyIndex::new(Action::Allow, [(dry, vec![payment()])]);
    let d = index.evaluate(&payment(), 8080, &c.order());
    assert!(d.allowed);
    assert_eq!(d.decided_by, DecidedBy::Default);
    assert_eq!(d.dry_run.len(), 1);
    assert_eq!(
        (d.dry_run[0].policy.name.as_str(), d.dry_run[0].rule),
        ("dry", 1)
    );
    assert!(index
        .evaluate(&payment(), 8080, &c.plaintext())
        .dry_run
        .is_empty());
}

#[test]
fn fast_deny_lists_what_the_destination_denies_for_this_client() {
    use std::path::PathBuf;
    let w = |name: &str, v4: &str, v6: &str| {
        format!("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}\nspec: {{node: n1, netns: /run/netns/{name}, addresses: ['{v4}', '{v6}'], serviceAccount: {name}}}\n---\n")
    };
    let text = format!(
        "{}{}{}{}apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{name: pay, namespace: shop}}\nspec: {{vips: [10.96.0.1], ports: [{{port: 80, targetPort: 8080}}, {{port: 81, targetPort: 8081}}], selector: {{app: payment}}}}\n---\n\
apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: block, namespace: shop}}\nspec: {{selector: {{matchLabels: {{app: payment}}}}, action: Deny, rules: [{{sourceLabels: {{app: analytics}}, notPorts: [8081]}}]}}\n---\n\
apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: v4-only, namespace: shop}}\nspec: {{selector: {{matchLabels: {{app: inventory}}}}, action: Deny, rules: [{{sourceCidrs: [{{cidr: 10.0.0.0/8}}], ports: [9000, 9001]}}]}}\n",
        w("order", "10.0.1.2", "fd00::12"),
        w("analytics", "10.0.1.3", "fd00::13"),
        w("payment", "10.0.2.2", "fd00::22"),
        w("inventory", "10.0.2.3", "fd00::23"),
    );
    let config = mesh_model::parse(&[(PathBuf::from("c.yaml"), text)]).unwrap();
    let index = PolicyIndex::new(config.mesh.default_action, config.selections());
    let of = |name: &str| {
        let w = &config.workloads[&key(&format!("shop/{name}"))];
        mesh_model::authz::fast_deny(&config, &index, w)
            .into_iter()
            .map(|(a, p)| format!("{a}:{p}"))
            .collect::<Vec<_>>()
    };
    assert!(
        of("order").iter().all(|e| e.starts_with("10.0.2.3:900")),
        "{:?}",
        of("order")
    );
    let analytics = of("analytics");
    // Every port but 8081 is denied: too many to list and not all, so payment's own address
    // is left to the destination; the VIP port that maps to 8080 is denied at the source.
    assert!(
        analytics.contains(&"10.96.0.1:80".to_string()),
        "{analytics:?}"
    );
    assert!(
        !analytics.contains(&"10.96.0.1:81".to_string()),
        "{analytics:?}"
    );
    assert!(
        !analytics.iter().any(|e| e.starts_with("10.0.2.2:")),
        "{analytics:?}"
    );
    // The CIDR rule only matches the IPv4 source, so only IPv4 destinations are listed.
    assert!(
        analytics.contains(&"10.0.2.3:9000".to_string())
            && analytics.contains(&"10.0.2.3:9001".to_string())
    );
    assert!(
        !analytics.iter().any(|e| e.starts_with("fd00::23")),
        "{analytics:?}"
    );
}
