//! `cargo xtask scale --quick`'s harness, on the debug build so that it cannot rot: 100
//! emulated nodes on one mesh-cp. It checks that every phase completes, every node is served
//! and what each phase should send was sent; it asserts no time.

use mesh_tests::{
    scale::{self, Options},
    topology::TEST_PREFIX,
};

#[test]
fn the_scale_harness_serves_every_emulated_node() {
    let everything = quick(false);
    let shape = everything.0.shape;
    // Every workload, every service, the mesh settings and the trust bundle, and what is
    // node 0's alone (its policies, fast-deny sets).
    assert!(
        everything.1.snapshot_resources >= shape.workloads + shape.services + 2,
        "{:?}",
        everything.1
    );

    // On demand: a node's snapshot has its own workloads and those it watches, no other,
    // and answers its address outside the mesh as absent.
    let (options, report) = quick(true);
    let own = shape.workloads / shape.nodes;
    let demand = shape.demand(0);
    assert_eq!(report.watched_per_node, demand.keys.len() + 1);
    assert!(
        report.snapshot_resources >= shape.services + 2 + demand.keys.len()
            && report.snapshot_resources < shape.services + 2 + 4 * own + demand.keys.len(),
        "{report:?}"
    );
    assert_eq!(report.absent, shape.nodes, "{report:?}");
    assert!(
        report.snapshot_mb * 4.0 < everything.1.snapshot_mb,
        "{report:?}"
    );
    assert_eq!(report.changes.len(), options.changes);
}

/// A quick run, on demand or not, with the checks that hold for both.
fn quick(on_demand: bool) -> (Options, scale::Report) {
    let out =
        std::env::temp_dir().join(format!("{TEST_PREFIX}scale-report-{}", std::process::id()));
    let mut options = Options::quick(TEST_PREFIX, out.clone());
    options.on_demand = on_demand;
    let report = scale::run(&options);
    let written = std::fs::read_to_string(out.join("latest.json"));
    let _ = std::fs::remove_dir_all(&out);
    let report = report.expect("the quick scale run completes");
    println!("{}", report.table);
    assert!(written.is_ok_and(|j| j.contains("cold_sync_s")));
    let shape = options.shape;
    assert_eq!(report.changes.len(), options.changes);
    for c in &report.changes {
        assert!(c.nodes > 0 && c.p99_ms.is_finite(), "{c:?}");
    }
    assert_eq!(
        report.changes[0].nodes, shape.nodes,
        "an added workload reaches every node"
    );
    // Every node came back from the storm naming its version, and was sent changes only.
    assert_eq!(report.storm_resumed, shape.nodes, "{report:?}");
    assert_eq!(report.storm_snapshots, 0, "{report:?}");
    assert!(
        report.storm_mb * 20.0 < report.snapshot_mb * shape.nodes as f64,
        "{report:?}"
    );
    (options, report)
}
