//! Nodes that take other nodes' workloads on demand (`mesh-node run --workloads-on-demand`):
//! a node is sent its own workloads and asks for the others as its pods use them, at the
//! source (a destination address, a Service's endpoints) and at the destination (the
//! tunnel's source, for the policy's labels). Real namespaces, real mesh-cp.

use std::time::Duration;

use mesh_tests::{
    app::{self, Server},
    mesh::{service_yaml, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.7.1";
const T: Duration = Duration::from_secs(30);

/// Other nodes' workloads that `node`'s streams watch, as mesh-cp's /status counts them.
fn watches(cp: &ControlPlane, node: &str) -> Option<u64> {
    cp.status()
        .ok()
        .and_then(|s| s["nodes"][node]["watches"].as_u64())
}

#[test]
fn a_node_on_demand_reaches_what_it_was_not_sent_and_refuses_what_it_cannot_learn() {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client", "other"]),
        NodeSpec::new("n2", &["server"]),
    ])
    .expect("topology");
    let _server = Server::start(topo.pod("server"), PORT).expect("server app");
    let (client, other, server) = (
        topo.pod("client").clone(),
        topo.pod("other").clone(),
        topo.pod("server").clone(),
    );
    // Only the client's labels let it in: the server's node must learn who the tunnel
    // comes from, labels included, to admit it.
    let allow_client = "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: only-client}\nspec: {selector: {matchLabels: {app: server}}, action: Allow, rules: [{sourceLabels: {app: client}}]}\n";
    let mesh = format!(
        "{}---\n{}---\n{allow_client}",
        workloads_yaml(&[&client, &other, &server]),
        service_yaml("web", VIP, 80, PORT, "server"),
    );
    let name = format!("{}-on-demand", topo.prefix);
    let mut cp = ControlPlane::start(&name, &[("mesh.yaml", &mesh)]).expect("mesh-cp");
    let on_demand = ["--workloads-on-demand"];
    let n1 = MeshNode::join_with(&mut topo, "n1", &cp, 2, &on_demand).expect("mesh-node n1");
    let n2 = MeshNode::join_with(&mut topo, "n2", &cp, 1, &on_demand).expect("mesh-node n2");
    // Each node holds its own workloads and has asked for nothing.
    assert_eq!(watches(&cp, "n1"), Some(0));
    assert_eq!(watches(&cp, "n2"), Some(0));

    let get = |from: &mesh_tests::Pod, host: &str, port: u16| {
        app::run(from, &["get", &format!("http://{host}:{port}/blob/100")], T)
    };
    // By the Service's VIP: n1 asks for its endpoint by key, n2 for the tunnel's source by
    // address, and the policy finds the client's labels.
    let out = get(&client, VIP, 80);
    assert_eq!(
        out["status"],
        200,
        "{out}\nn1:\n{}\nn2:\n{}",
        n1.log(),
        n2.log()
    );
    assert!(n1.stat("tunnels_out") >= 1, "through the mesh");
    assert_eq!(watches(&cp, "n1"), Some(1), "the endpoint, by key");
    assert_eq!(
        watches(&cp, "n2"),
        Some(2),
        "the source's address and its workload"
    );
    // By the server's address, held now.
    let out = get(&client, &server.ipv4.to_string(), PORT);
    assert_eq!(out["status"], 200, "{out}");
    // Another pod of the client's node may not reach the server: refused in n1's kernel
    // (mesh-cp computed the fast-deny from the server's policy; n1 needs no lookup for it).
    let probe = |from: &mesh_tests::Pod, host: &str, port: u16| {
        app::run(from, &["probe", host, &port.to_string()], T)["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(probe(&other, &server.ipv4.to_string(), PORT), "eperm");
    assert_eq!(n2.stat("unresolved"), 0);

    // Without the control plane, an address nobody has told n1 about is refused within the
    // lookup's wait (reset, with the reason counted and logged), never passed by.
    cp.pause().expect("stop mesh-cp");
    let outcome = probe(&client, "10.97.0.9", 80);
    assert!(["reset", "eof"].contains(&outcome.as_str()), "{outcome}");
    assert!(n1.stat("unresolved") >= 1, "{}", n1.log());
    assert!(n1.log().contains("did not say within"), "{}", n1.log());
    // What it holds still works.
    let out = get(&client, &server.ipv4.to_string(), PORT);
    assert_eq!(out["status"], 200, "{out}");

    // A restarted control plane (a new epoch: snapshots) is told first what each node
    // watches, and answers it in the snapshot: the nodes keep the workloads they had.
    let before = n2.stat("unresolved");
    cp.resume().expect("restart mesh-cp");
    let deadline = std::time::Instant::now() + T;
    while watches(&cp, "n1").is_none_or(|w| w < 2) || watches(&cp, "n2").is_none_or(|w| w < 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "watches not named again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = get(&client, VIP, 80);
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(n2.stat("unresolved"), before);
}
