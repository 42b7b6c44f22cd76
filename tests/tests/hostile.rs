//! Hostile input against a node's open ports: whatever a stranger sends must not stop the
//! node's mesh. Each attack runs while a meshed client keeps calling across the nodes and
//! the attacked node's admin endpoint keeps being probed.

use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const TUNNEL: u16 = 15008;
const T: Duration = Duration::from_secs(60);

struct Mesh {
    _cp: ControlPlane,
    n1: MeshNode,
    n2: MeshNode,
    _server: Server,
    /// Last: the daemons stop before the topology's teardown.
    topo: Topology,
}

/// n1 runs the meshed `client` and `outsider` (not in the mesh); n2 runs the meshed `server`,
/// the target of every attack.
fn mesh(test: &str) -> Mesh {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client", "outsider"]),
        NodeSpec::new("n2", &["server"]),
    ])
    .expect("topology");
    let server = Server::start(topo.pod("server"), PORT).expect("server app");
    let yaml = format!(
        "{}---\n{}",
        workloads_yaml(&[topo.pod("client"), topo.pod("server")]),
        mesh_config_yaml("tls", ""),
    );
    let cp = ControlPlane::start(&format!("{}-{test}", topo.prefix), &[("mesh.yaml", &yaml)])
        .expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 1).expect("mesh-node n2");
    Mesh {
        _cp: cp,
        n1,
        n2,
        _server: server,
        topo,
    }
}

/// Probes `/healthz` of `node` every 50 ms until `until`; returns the failures.
fn probe_health(node: &MeshNode, until: Instant) -> Vec<String> {
    let mut failures = Vec::new();
    while Instant::now() < until {
        match node.admin_get("/healthz") {
            Ok((200, _)) => {}
            Ok((code, body)) => failures.push(format!("{code} {body}")),
            Err(e) => failures.push(e.to_string()),
        }
        thread::sleep(Duration::from_millis(50));
    }
    failures
}

/// Regression (issue 19): three connections to a mesh pod's tunnel port, each sending nine
/// bytes (a record holding the first four bytes of a ClientHello that spans records) and then
/// nothing, put the destination node's daemon in a loop at full CPU: its admin endpoint
/// stopped answering and meshed calls through it stalled. From outside the mesh and from a
/// mesh pod alike.
#[test]
fn split_client_hellos_do_not_stop_the_node() {
    let mut m = mesh("hello");
    let server = m.topo.pod("server").ipv4.to_string();
    let nine_bytes = "160301000401000100";
    let attack = |pod: &str| {
        app::start(
            m.topo.pod(pod),
            &["stall", &server, &TUNNEL.to_string(), nine_bytes, "3", "4"],
        )
        .expect("attacker")
    };
    let attackers = [attack("outsider"), attack("client")];
    let until = Instant::now() + Duration::from_secs(4);
    let (calls, health) = thread::scope(|s| {
        let health = s.spawn(|| probe_health(&m.n2, until));
        let calls = app::run(
            m.topo.pod("client"),
            &["loop", &server, &PORT.to_string(), "40"],
            T,
        );
        (calls, health.join().expect("health prober"))
    });
    for attacker in attackers {
        let out = app::finish(attacker, T);
        assert_eq!(out["opened"], 3, "{out}");
    }
    assert_eq!(calls["failures"], 0, "{calls}\nn2 log:\n{}", m.n2.log());
    assert!(health.is_empty(), "n2's /healthz failed: {health:?}");
    // The handshakes ended when their peers closed, each counted as a refused tunnel.
    m.n2.wait_for(Duration::from_secs(10), |s| s["tunnels_in_refused"] >= 6)
        .unwrap_or_else(|e| panic!("{e}\nn2 log:\n{}", m.n2.log()));
    assert!(m.n1.stat("tunnels_out") >= 40);
}
