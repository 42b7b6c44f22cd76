//! `mycel`, the operator's command line, against a running two-node mesh: `check` passes, then
//! names a rejected policy and a stopped node; `status -o json` agrees with mesh-cp's
//! `/debug/nodes`; `policies`, `explain` and `stat` answer from the config in force and the
//! nodes' metrics. A short certificate lifetime fails the check; `check --pre` passes on this
//! host and names a cgroup that is not cgroup v2.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use mesh_tests::{
    app::{self, Server},
    demo::{block_analytics, Demo, PORT},
    mesh::{http_get, mesh_config_yaml, sibling_bin, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const T: Duration = Duration::from_secs(30);

fn mycel(cp: &ControlPlane, args: &[&str]) -> Output {
    Command::new(sibling_bin("mycel", "MYCEL_BIN"))
        .args(args)
        .env("MYCEL_CP", cp.http.to_string())
        .output()
        .expect("run mycel")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(cp: &ControlPlane, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = mycel(cp, &all);
    assert!(out.status.success(), "mycel {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Runs `mycel check` until `done` holds for its output, or fails with the last one.
fn check_until(cp: &ControlPlane, done: impl Fn(&Output, &str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let out = mycel(cp, &["check"]);
        let t = text(&out);
        if done(&out, &t) {
            return t;
        }
        assert!(Instant::now() < deadline, "{t}\n{}", cp.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn check_status_policies_explain_and_stat_on_a_running_mesh() {
    // Borrowed, not moved out: the mesh is dropped in its fields' order (daemons first).
    let mut demo = Demo::start("cli");
    let Demo {
        n1, n2, cp, topo, ..
    } = &mut demo;

    // Healthy: every check passes, and says so per node.
    let healthy = check_until(cp, |out, _| out.status.success());
    for line in [
        "ok    mesh-cp: ready at",
        "ok    config: version",
        "ok    node n1: connected, holds the version in force; workloads placed: 2",
        "ok    node n2: connected, holds the version in force; workloads placed: 1",
        "ok    certificates on n1: 2 of 2 workloads hold one issued since mesh-cp started; the first expires",
        "ok    CA root: expires",
        " 0 failed",
    ] {
        assert!(healthy.contains(line), "{line:?} in\n{healthy}");
    }
    println!("mycel check, healthy:\n{healthy}");

    // status -o json: the nodes as /debug/nodes has them.
    let status = json(cp, &["status"]);
    let debug: serde_json::Value =
        serde_json::from_str(&http_get(cp.http, "/debug/nodes").expect("/debug/nodes"))
            .expect("JSON");
    assert_eq!(status["nodes"], debug["nodes"], "{status}\n{debug}");
    assert_eq!(status["config"]["version"], debug["config_version"]);
    for (node, workloads) in [("n1", 2), ("n2", 1)] {
        let n = &status["nodes"][node];
        assert_eq!(n["streams"], 1, "{n}");
        assert_eq!(n["workloads"], workloads, "{n}");
        assert_eq!(n["certificates"], workloads, "{n}");
        assert_eq!(n["acked_version"], status["config"]["version"], "{n}");
        assert!(
            n["certificates_expire"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z')),
            "{n}"
        );
    }
    let table = text(&mycel(cp, &["status"]));
    println!("mycel status:\n{table}");
    assert!(
        table.contains("NODE") && table.contains("current, acked"),
        "{table}"
    );

    // A version with nothing for n1 (a policy that selects only payment, on n2): n1 holds it
    // all the same. Before, n1 was "behind" until its next stream.
    let changed = cp
        .apply(
            "block-analytics.yaml",
            &block_analytics(&["nobody"]),
            &["n2"],
        )
        .expect("a policy change");
    let current = check_until(cp, |out, t| {
        out.status.success() && t.contains("ok    node n2: connected, holds the version in force")
    });
    assert!(
        current.contains("ok    node n1: connected, holds the version in force"),
        "version {changed}:\n{current}"
    );
    let status = json(cp, &["status"]);
    assert_eq!(status["nodes"]["n1"]["synced_version"], changed, "{status}");
    println!(
        "n1 after a version with nothing for it: {}",
        status["nodes"]["n1"]
    );

    // policies: what each selects.
    let policies = json(cp, &["policies"]);
    assert_eq!(
        policies["policies"],
        serde_json::json!([{
            "key": "default/block-analytics", "action": "Deny", "mode": "Enforce",
            "rules": 2, "mesh_wide": false, "selects": ["default/payment"],
        }]),
        "{policies}"
    );

    // explain, as mesh-cp explain --cp answers it.
    let e = json(
        cp,
        &[
            "explain",
            "--from",
            "default/analytics",
            "--to",
            "default/payment",
            "--port",
            "8080",
        ],
    );
    assert_eq!(e["verdicts"][0]["allowed"], false, "{e}");
    assert_eq!(e["verdicts"][0]["policy"], "default/block-analytics", "{e}");

    // stat from the nodes' /metrics: the pair order -> payment, with its connections.
    let ip = topo.pod("payment").ipv4.to_string();
    let out = app::run(topo.pod("order"), &["loop", &ip, &PORT.to_string(), "5"], T);
    assert_eq!(out["failures"], 0, "{out}");
    let (m1, m2) = (n1.metrics.to_string(), n2.metrics.to_string());
    let stat_args = ["stat", "--node", &m1, "--node", &m2, "--interval", "0.5"];
    let deadline = Instant::now() + T;
    let pair = loop {
        let pairs = json(cp, &stat_args);
        let found = pairs
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["source"] == "default/order" && p["destination"] == "default/payment");
        if let Some(p) = found.filter(|p| p["connections_total"] == 5.0) {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "{pairs}");
    };
    assert_eq!(pair["failures_total"], 0.0, "{pair}");
    // Without --node: the nodes at the metrics port each told mesh-cp.
    let known = json(cp, &["stat", "--interval", "0.2"]);
    assert!(
        known.as_array().into_iter().flatten().any(|p| {
            p["source"] == "default/order"
                && p["destination"] == "default/payment"
                && p["connections_total"] == 5.0
        }),
        "{known}"
    );
    let stat = text(&mycel(cp, &stat_args));
    println!("mycel stat:\n{stat}");
    assert!(
        stat.contains("default/order") && stat.contains("default/payment"),
        "{stat}"
    );

    // A rejected policy: the check fails and names the file.
    let error = cp
        .apply_invalid(
            "bad-policy.yaml",
            "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: { name: bad, namespace: default }\nspec: { action: Maybe }\n",
        )
        .expect("the config error");
    let rejected = check_until(cp, |out, t| {
        !out.status.success() && t.contains("FAIL  config: the files are rejected")
    });
    assert_eq!(rejected.matches("bad-policy.yaml").count(), 1, "{rejected}");
    assert!(rejected.contains(&error), "{error} in\n{rejected}");
    assert!(rejected.contains("stays in force"), "{rejected}");
    println!("mycel check, a policy rejected:\n{rejected}");
    cp.remove_config("bad-policy.yaml")
        .expect("remove the bad file");
    check_until(cp, |out, _| out.status.success());

    // A stopped node: the check fails and names it.
    n2.stop_with(libc::SIGTERM).expect("stop n2");
    let stopped = check_until(cp, |out, t| {
        !out.status.success() && t.contains("FAIL  node n2: is not connected since")
    });
    assert!(stopped.contains("ok    node n1:"), "{stopped}");
    println!("mycel check, n2 stopped:\n{stopped}");
    let status = json(cp, &["status"]);
    assert_eq!(status["nodes"]["n2"]["streams"], 0, "{status}");
    assert!(
        status["nodes"]["n2"]["disconnected_at"].is_string(),
        "{status}"
    );
}

#[test]
fn a_short_certificate_lifetime_fails_the_check() {
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["order"])]).expect("topology");
    let pods = [topo.pod("order")];
    let cp = ControlPlane::start(
        &format!("{}-cli-ttl", topo.prefix),
        &[
            ("workloads.yaml", &workloads_yaml(&pods)),
            ("mesh.yaml", &mesh_config_yaml("tls", "certTtl: 30m")),
        ],
    )
    .expect("mesh-cp");
    let _n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1");
    let out = check_until(&cp, |out, t| {
        !out.status.success() && t.contains("FAIL  certificates on n1:")
    });
    assert!(
        out.contains("MeshConfig certTtl is 30m0s, within 1h0m")
            && out.contains("raise MeshConfig certTtl"),
        "{out}"
    );
    assert!(out.contains("ok    node n1: connected"), "{out}");
    println!("mycel check, certTtl 30m:\n{out}");
}

#[test]
fn check_pre_passes_on_this_host_and_names_a_cgroup_that_is_not_v2() {
    let pre = |extra: &[&str]| {
        let out = Command::new(sibling_bin("mycel", "MYCEL_BIN"))
            .args(["check", "--pre", "--admin-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .expect("run mycel");
        (out.status.success(), text(&out))
    };
    let (ok, out) = pre(&[]);
    assert!(ok, "{out}");
    for line in [
        "ok    kernel: Linux",
        "ok    cgroup v2:",
        "ok    BPF: a BPF map can be created here",
        "ok    capabilities:",
        "ok    admin port: 127.0.0.1:0 is free",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }
    println!("mycel check --pre:\n{out}");
    let (ok, out) = pre(&["--cgroup", "/proc"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  cgroup v2: /proc is not in a cgroup v2 hierarchy"),
        "{out}"
    );
    let (ok, out) = pre(&["--cgroup", "/sys/fs/cgroup/no-such-mycel-cgroup"]);
    assert!(!ok && out.contains("does not exist"), "{out}");

    // A pod whose application listens on the tunnel port: mesh-node could not enrol it.
    let topo = Topology::new(&[NodeSpec::new("n1", &["app"])]).expect("topology");
    let netns = topo.pod("app").netns_path();
    let netns = netns.to_string_lossy();
    let (ok, out) = pre(&["--netns", &netns]);
    assert!(ok, "{out}");
    assert!(out.contains("ok    ports in "), "{out}");
    let _server = Server::start(topo.pod("app"), 15008).expect("a server on 15008");
    let (ok, out) = pre(&["--netns", &netns]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  ports in ") && out.contains("taken: 15008/tcp"),
        "{out}"
    );
}
