//! One policy check at 10,000 policies: the index against the linear scan it replaces.
//!
//! `cargo bench -p mesh-model --bench authz`. Two meshes: policies spread over 1,000 workloads
//! (10 each, the common shape), and all 10,000 policies selecting the one destination (the worst
//! case for the index: only the port filing helps).

use std::{collections::BTreeMap, hint::black_box, net::IpAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use mesh_model::{
    authz::{linear, PolicyIndex, Selection, Source, SourceWorkload},
    policy::{AccessPolicy, Clause, IdentityPattern, Matcher, PortRange, Rule},
    Action, Mode, ObjectKey,
};

const POLICIES: usize = 10_000;

fn policy(i: usize, port: u16) -> AccessPolicy {
    let clause = |matcher| Clause {
        negated: false,
        matcher,
    };
    AccessPolicy {
        key: ObjectKey::new(&format!("ns{}", i % 50), &format!("p{i}")),
        selector: BTreeMap::new(),
        action: if i.is_multiple_of(3) {
            Action::Deny
        } else {
            Action::Allow
        },
        mode: Mode::Enforce,
        rules: vec![Rule {
            clauses: vec![
                clause(Matcher::Identities(vec![IdentityPattern::Exact(format!(
                    "spiffe://cluster.local/ns/ns{}/sa/client{}",
                    i % 50,
                    i % 7
                ))])),
                clause(Matcher::Ports(vec![PortRange {
                    first: port,
                    last: port,
                }])),
            ],
        }],
    }
}

fn spread() -> Vec<Selection> {
    (0..POLICIES)
        .map(|i| {
            let workload = ObjectKey::new(&format!("ns{}", i % 50), &format!("w{}", i % 1000));
            (policy(i, 8000 + (i % 10) as u16), vec![workload])
        })
        .collect()
}

fn concentrated(target: &ObjectKey) -> Vec<Selection> {
    (0..POLICIES)
        .map(|i| (policy(i, 1000 + i as u16), vec![target.clone()]))
        .collect()
}

fn bench(c: &mut Criterion) {
    let labels = BTreeMap::new();
    let src = Source {
        address: IpAddr::from([10, 0, 0, 7]),
        workload: Some(SourceWorkload {
            identity: "spiffe://cluster.local/ns/ns7/sa/client3",
            namespace: "ns7",
            labels: &labels,
        }),
    };
    let target = ObjectKey::new("ns7", "w7");
    for (name, selections) in [
        ("spread", spread()),
        ("concentrated", concentrated(&target)),
    ] {
        let index = PolicyIndex::new(Action::Allow, selections.clone());
        assert_eq!(
            index.evaluate(&target, 8007, &src),
            linear::evaluate(Action::Allow, &selections, &target, 8007, &src)
        );
        let mut group = c.benchmark_group(format!("check_10k_policies_{name}"));
        group.bench_function("index", |b| {
            b.iter(|| index.evaluate(black_box(&target), black_box(8007), black_box(&src)))
        });
        group.sample_size(10);
        group.bench_function("linear_scan", |b| {
            b.iter(|| {
                linear::evaluate(
                    Action::Allow,
                    black_box(&selections),
                    black_box(&target),
                    black_box(8007),
                    black_box(&src),
                )
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
