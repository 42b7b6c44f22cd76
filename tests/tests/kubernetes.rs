//! Kubernetes mode end to end: mesh-cp and two mesh-nodes read the cluster from the fake API
//! server (the one stand-in allowed), while the pods are real network namespaces captured by
//! the real eBPF programs. Pods are enrolled by the CNI plugin before it returns, or found in
//! /proc when they were running before the daemon; policy comes from AccessPolicy objects,
//! with the same verdicts as in universal mode.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    app::{self, Server},
    kube::{run_cni, FakeCluster},
    mesh::KubeNode,
    topology::spawn_in,
    ControlPlane, MeshNode, NodeSpec, Topology,
};
use serde_json::{json, Value};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(30);
const ANALYTICS_DENIED: &str = "no-analytics-to-payment";

fn namespace(name: &str, labels: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "labels": labels } })
}

/// The Kubernetes pod `namespace/name` for the topology pod `name`, on its node.
fn pod(topo: &Topology, namespace: &str, name: &str) -> Value {
    let p = topo.pod(name);
    json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace, "uid": uid(name),
                          "labels": { "app.kubernetes.io/name": name } },
            "spec": { "nodeName": p.node, "serviceAccountName": name,
                      "containers": [{ "name": "app", "image": "app" }] },
            "status": { "phase": "Running", "podIP": p.ipv4.to_string(),
                        "podIPs": [{ "ip": p.ipv4.to_string() }, { "ip": p.ipv6.to_string() }] } })
}

fn uid(name: &str) -> String {
    format!("uid-{name}")
}

struct Cluster {
    cp: ControlPlane,
    n1: MeshNode,
    n2: MeshNode,
    sockets: [PathBuf; 2],
    _servers: Vec<Server>,
    /// A process of inventory that ran before the daemons, in a cgroup named for its pod.
    early: Child,
    kube: FakeCluster,
    topo: Topology,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.early.kill();
        let _ = self.early.wait();
    }
}

impl Cluster {
    fn connects(&self, from: &str, to: &str) -> bool {
        let ip = self.topo.pod(to).ipv4.to_string();
        let out = app::run(
            self.topo.pod(from),
            &["loop", &ip, &PORT.to_string(), "1"],
            T,
        );
        out["failures"] == 0
    }

    fn add(&self, node: usize, namespace: &str, name: &str) -> std::process::Output {
        self.kube
            .cni(
                "ADD",
                &self.sockets[node],
                self.topo.pod(name),
                (namespace, name, &uid(name)),
            )
            .expect("run the CNI plugin")
    }

    fn logs(&self) -> String {
        format!(
            "mesh-cp:\n{}\nn1:\n{}\nn2:\n{}",
            self.cp.log(),
            self.n1.log(),
            self.n2.log()
        )
    }
}

fn eventually(what: &str, c: &Cluster, done: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {T:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start() -> Cluster {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["order", "analytics"]),
        NodeSpec::new("n2", &["payment", "inventory", "outside"]),
    ])
    .expect("topology");
    let servers = ["payment", "inventory", "outside"]
        .map(|p| Server::start(topo.pod(p), PORT).expect("server"))
        .into();
    // Running before the daemon, in the kubelet's way: a cgroup whose name holds the pod uid.
    let inventory = topo.pod("inventory").clone();
    let cg = topo
        .add_cgroup_below(&inventory.cgroup, &format!("pod{}", uid("inventory")))
        .expect("cgroup");
    let early = spawn_in(
        Some(&inventory.netns_path()),
        Some(&cg),
        Command::new("sleep").arg("600").stdin(Stdio::null()),
    )
    .expect("sleep in inventory");

    let kube = FakeCluster::start(&topo.prefix).expect("fake API");
    kube.apply(
        "namespaces",
        namespace("shop", json!({ "mycel.dev/mesh": "enabled" })),
    );
    kube.apply("namespaces", namespace("web", json!({})));
    kube.apply(
        "namespaces",
        namespace("mycel-system", json!({ "mycel.dev/mesh": "disabled" })),
    );
    for name in ["order", "payment", "inventory"] {
        kube.apply("pods", pod(&topo, "shop", name));
    }
    kube.apply("pods", pod(&topo, "web", "outside"));
    kube.apply(
        "meshconfigs",
        json!({ "apiVersion": "mycel.dev/v1alpha1", "kind": "MeshConfig",
                "metadata": { "name": "mesh" },
                "spec": { "transport": "quic", "mtls": { "mode": "Permissive" } } }),
    );
    kube.apply(
        "accesspolicies",
        json!({ "apiVersion": "mycel.dev/v1alpha1", "kind": "AccessPolicy",
                "metadata": { "name": ANALYTICS_DENIED, "namespace": "shop" },
                "spec": { "selector": { "matchLabels": { "app.kubernetes.io/name": "payment" } },
                          "action": "Deny",
                          "rules": [{ "sourceIdentities": ["spiffe://cluster.local/ns/shop/sa/analytics"] }] } }),
    );

    let cp = ControlPlane::start_kubernetes(&topo.prefix, &kube.kubeconfig).expect("mesh-cp");
    let cp_ca = kube.trust_bundle(T).expect("trust bundle");
    let mut nodes = Vec::new();
    let mut sockets = Vec::new();
    for node in ["n1", "n2"] {
        let cni_socket = kube.dir.join(format!("{node}-cni.sock"));
        let args = KubeNode {
            kubeconfig: kube.kubeconfig.clone(),
            token_file: kube.node_token(node).expect("node token"),
            cp_ca: cp_ca.clone(),
            cni_socket: cni_socket.clone(),
        };
        nodes.push(MeshNode::kubernetes(&mut topo, node, &cp, &args, &[]).expect("mesh-node"));
        sockets.push(cni_socket);
    }
    let n2 = nodes.pop().expect("n2");
    let n1 = nodes.pop().expect("n1");
    Cluster {
        cp,
        n1,
        n2,
        sockets: [sockets[0].clone(), sockets[1].clone()],
        _servers: servers,
        early,
        kube,
        topo,
    }
}

#[test]
fn pods_are_captured_before_they_start_and_access_policies_apply() {
    let mut c = start();
    // inventory was running before the daemon: found in /proc by its pod uid. Nothing else is
    // captured before the CNI plugin reports it.
    c.n2.wait_enrolled(1).expect("inventory found in /proc");
    c.n1.wait_enrolled(0).expect("n1 attached");

    // The runtime's ADD for order: when the plugin returns, order is captured.
    let out = c.add(0, "shop", "order");
    assert!(out.status.success(), "ADD order: {out:?}\n{}", c.logs());
    let result: Value = serde_json::from_slice(&out.stdout).expect("ADD prints a result");
    assert_eq!(
        result["ips"][0]["address"],
        format!("{}/24", c.topo.pod("order").ipv4),
        "the network plugin's result is passed on"
    );
    assert_eq!(
        c.n1.stat("enrolled_workloads"),
        1,
        "order enrolled before ADD returned"
    );

    // A pod whose ADD comes before the node's watch has seen it: the plugin waits for it.
    let early_add = {
        let (dir, socket) = (c.kube.dir.clone(), c.sockets[0].clone());
        let analytics = c.topo.pod("analytics").clone();
        std::thread::spawn(move || {
            let k8s_pod = ("shop", "analytics", uid("analytics"));
            run_cni(
                &dir,
                "ADD",
                &socket,
                &analytics,
                (k8s_pod.0, k8s_pod.1, &k8s_pod.2),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // As the kubelet runs the sandbox: the pod has no address yet, so mesh-cp does not know it.
    let mut pending = pod(&c.topo, "shop", "analytics");
    pending["status"] = json!({ "phase": "Pending" });
    c.kube.apply("pods", pending);
    let out = early_add
        .join()
        .expect("ADD thread")
        .expect("run the CNI plugin");
    assert!(out.status.success(), "ADD analytics: {out:?}\n{}", c.logs());
    assert_eq!(c.n1.stat("enrolled_workloads"), 2);
    // Its first connection to a mesh pod waits for its identity instead of failing: the
    // address reaches the API a second later, then mesh-cp and the node do their part.
    let inventory = c.topo.pod("inventory").ipv4.to_string();
    let first = app::start(c.topo.pod("analytics"), &["loop", &inventory, "8080", "1"])
        .expect("analytics' first connection");
    std::thread::sleep(Duration::from_secs(1));
    c.kube.apply("pods", pod(&c.topo, "shop", "analytics"));
    let first = app::finish(first, T);
    assert_eq!(first["failures"], 0, "{first}\n{}", c.logs());

    let out = c.add(1, "shop", "payment");
    assert!(out.status.success(), "ADD payment: {out:?}\n{}", c.logs());
    // A pod outside the mesh starts uncaptured.
    let out = c.add(1, "web", "outside");
    assert!(out.status.success(), "ADD outside: {out:?}\n{}", c.logs());
    assert_eq!(c.n2.stat("enrolled_workloads"), 2);

    for n in [&mut c.n1, &mut c.n2] {
        n.wait_for(T, |s| s["svids"] == 2 && s["cp_connected"] == 1)
            .expect("certificates for the node's pods");
    }
    // The policy from the AccessPolicy object: analytics is refused in its own node's kernel.
    eventually("the deny in n1's kernel", &c, || {
        c.n1.stat("fast_deny_entries") >= 2
    });
    let payment = c.topo.pod("payment").ipv4.to_string();
    let probe = app::run(c.topo.pod("analytics"), &["probe", &payment, "8080"], T);
    assert_eq!(
        probe["outcome"],
        "eperm",
        "analytics -> payment: {probe}\n{}",
        c.logs()
    );
    assert!(
        c.connects("order", "payment"),
        "order -> payment\n{}",
        c.logs()
    );
    assert!(
        c.connects("order", "inventory"),
        "order -> inventory\n{}",
        c.logs()
    );
    // The MeshConfig object's transport is in force.
    let (tunnels, quic) = (c.n1.stat("tunnels_out"), c.n1.stat("tunnels_quic"));
    assert!(
        tunnels >= 2 && quic == tunnels,
        "{tunnels} tunnels, {quic} over QUIC"
    );
    // The policy's status says it is in force and what it selects.
    let status = c
        .kube
        .api
        .get("accesspolicies", "shop", ANALYTICS_DENIED)
        .expect("policy")["status"]
        .clone();
    assert_eq!(status["selectedWorkloads"], 1, "{status}");
    assert_eq!(status["conditions"][0]["status"], "True", "{status}");

    // A broken AccessPolicy is left out alone: its status says why, and the deny stays.
    c.kube.apply(
        "accesspolicies",
        json!({ "apiVersion": "mycel.dev/v1alpha1", "kind": "AccessPolicy",
                "metadata": { "name": "broken", "namespace": "shop" },
                "spec": { "selector": { "matchLabels": { "app.kubernetes.io/name": "payment" } },
                          "action": "Block", "rules": [] } }),
    );
    let broken = || {
        c.kube
            .api
            .get("accesspolicies", "shop", "broken")
            .unwrap_or_default()
    };
    eventually("the broken policy's status", &c, || {
        broken()["status"]["conditions"][0]["reason"] == "Invalid"
    });
    assert_eq!(broken()["status"]["conditions"][0]["status"], "False");
    let probe = app::run(c.topo.pod("analytics"), &["probe", &payment, "8080"], T);
    assert_eq!(probe["outcome"], "eperm", "after a broken policy: {probe}");

    // What the CNI socket answered, on the nodes' metrics.
    let n1_metrics = c.n1.metrics_text().expect("n1 metrics");
    let n2_metrics = c.n2.metrics_text().expect("n2 metrics");
    for (text, line) in [
        (
            &n1_metrics,
            r#"mycel_cni_requests_total{command="add",outcome="enrolled"} 2"#,
        ),
        (
            &n2_metrics,
            r#"mycel_cni_requests_total{command="add",outcome="enrolled"} 1"#,
        ),
        (
            &n2_metrics,
            r#"mycel_cni_requests_total{command="add",outcome="not_in_mesh"} 1"#,
        ),
        (&n2_metrics, "mycel_pods_found_in_proc_total 1"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }

    // Deleting the object lifts the deny.
    c.kube
        .api
        .delete("accesspolicies", "shop", ANALYTICS_DENIED);
    eventually("the deny lifted", &c, || {
        c.n1.stat("fast_deny_entries") == 0
    });
    assert!(
        c.connects("analytics", "payment"),
        "after the policy's deletion\n{}",
        c.logs()
    );

    // The runtime's DEL, and a pod deleted from the API: both leave the mesh.
    let out = c
        .kube
        .cni(
            "DEL",
            &c.sockets[0],
            c.topo.pod("analytics"),
            ("shop", "analytics", &uid("analytics")),
        )
        .expect("DEL");
    assert!(out.status.success(), "DEL analytics: {out:?}");
    c.n1.wait_enrolled(1).expect("analytics released");
    c.kube.api.delete("pods", "shop", "inventory");
    c.n2.wait_enrolled(1).expect("inventory released");
    assert!(c.connects("order", "payment"));
    let config: Value =
        serde_json::from_str(&c.n1.admin_get("/debug/config").expect("debug").1).expect("json");
    let order = config["workloads"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["key"] == "shop/order"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(order["on_this_node"], true, "{config}");
}

/// `mesh-node install-cni` as the init container runs it: the copy it makes is the CNI plugin
/// (the binary answers CNI when named `mycel-cni`), chained last in the runtime's config.
#[test]
fn install_cni_puts_a_working_plugin_in_the_chain() {
    let dir = std::env::temp_dir().join(format!("mycel-t-install-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::create_dir_all(&conf).expect("conf dir");
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    std::fs::write(
        conf.join("10-net.conflist"),
        r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("conflist");
    let out = Command::new(mesh_tests::mesh::mesh_node_bin())
        .arg("install-cni")
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .output()
        .expect("mesh-node install-cni");
    assert!(out.status.success(), "{out:?}");
    let chained: Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-net.conflist")).unwrap())
            .expect("json");
    assert_eq!(chained["plugins"][1]["type"], "mycel-cni", "{chained}");
    assert_eq!(chained["plugins"][1]["socket"], "/run/mycel/cni.sock");
    assert_eq!(
        chained["plugins"][1]["excludeNamespaces"],
        json!(["kube-system", "mycel-system"])
    );
    let version = Command::new(bin.join("mycel-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("the installed plugin");
    assert!(version.status.success(), "{version:?}");
    let answer: Value = serde_json::from_slice(&version.stdout).expect("CNI JSON");
    assert!(answer["supportedVersions"]
        .as_array()
        .is_some_and(|v| v.contains(&json!("1.0.0"))));

    // Without a network plugin's configuration: a clear one-line error, exit 1.
    std::fs::remove_file(conf.join("10-net.conflist")).expect("rm");
    let out = Command::new(mesh_tests::mesh::mesh_node_bin())
        .args(["install-cni", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .output()
        .expect("mesh-node install-cni");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no CNI configuration") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}
