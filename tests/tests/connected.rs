//! mesh-node following a real mesh-cp: enrollment from the config stream, workload
//! certificates, config changes without restarts, and a control-plane outage.

use std::time::Duration;

use mesh_tests::{
    app::{self, Server},
    mesh::workloads_yaml,
    relay::Relay,
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

struct Setup {
    cp: ControlPlane,
    node: MeshNode,
    _server: Server,
    /// Last, so it is dropped last: the daemons stop cleanly (releasing their cgroup
    /// claims) before the topology's teardown kills whatever runs in its cgroups.
    topo: Topology,
}

/// One node with pods a, b (in the config) and c (not yet); a server in b.
fn setup(test: &str) -> Setup {
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["a", "b", "c"])]).expect("topology");
    let daemon_cg = topo
        .add_cgroup_below(&topo.node("n1").cgroup.clone(), "mesh-node")
        .expect("daemon cgroup");
    let server = Server::start(topo.pod("b"), PORT).expect("server in b");
    let yaml = workloads_yaml(&[topo.pod("a"), topo.pod("b")]);
    let cp = ControlPlane::start(
        &format!("{}-{test}", topo.prefix),
        &[("workloads.yaml", &yaml)],
    )
    .expect("mesh-cp");
    let mut node =
        MeshNode::connect(topo.node("n1"), &cp, Some(&daemon_cg), &[]).expect("mesh-node");
    node.wait_for(Duration::from_secs(30), |s| {
        s["enrolled_workloads"] == 2 && s["svids"] == 2 && s["cp_connected"] == 1
    })
    .expect("enrolled with certificates");
    Setup {
        topo,
        cp,
        node,
        _server: server,
    }
}

/// a → b over the mesh; the proxy must have forwarded it.
fn call_b(s: &Setup) {
    let before = s.node.stat("proxy_forwarded");
    let same_node_before = s.node.stat("proxy_same_node");
    let b = s.topo.pod("b");
    let out = app::run(
        s.topo.pod("a"),
        &["get", &format!("http://{}:{PORT}/blob/1000", b.ipv4)],
        T,
    );
    assert_eq!(out["status"], 200, "{out}");
    assert!(s.node.stat("proxy_forwarded") > before, "not proxied");
    // Both pods are on this node: delivered directly, without a tunnel.
    assert!(s.node.stat("proxy_same_node") > same_node_before);
    assert_eq!(s.node.stat("tunnels_out"), 0);
}

#[test]
fn node_enrolls_what_the_control_plane_places_on_it_and_holds_its_certificates() {
    let mut s = setup("follow");
    call_b(&s);
    let certs = s.node.cert_serials().unwrap();
    for sa in ["a", "b"] {
        assert!(
            certs.contains_key(&format!("spiffe://cluster.local/ns/default/sa/{sa}")),
            "{certs:?}"
        );
    }
    assert!(s.node.log().contains("certificate obtained"));
    // Times in RFC 3339 in both logs, not a SystemTime's or an OffsetDateTime's Debug.
    for log in [s.node.log(), s.cp.log()] {
        let line = log
            .lines()
            .find(|l| l.contains("certificate obtained") || l.contains("certificate issued"))
            .unwrap_or_default()
            .to_owned();
        let at = line.split("not_after=").nth(1).unwrap_or_default();
        assert!(
            at.len() >= 20 && at.as_bytes()[10] == b'T' && !line.contains("SystemTime"),
            "{line}"
        );
    }

    // Added and removed in the config dir: enrolled and unenrolled without a restart.
    let c = workloads_yaml(&[s.topo.pod("c")]);
    s.cp.write_config("c.yaml", &c).unwrap();
    s.node
        .wait_for(T, |st| st["enrolled_workloads"] == 3 && st["svids"] == 3)
        .expect("c enrolled");
    s.cp.write_config("workloads.yaml", &workloads_yaml(&[s.topo.pod("a")]))
        .unwrap();
    s.node
        .wait_for(T, |st| st["enrolled_workloads"] == 2 && st["svids"] == 2)
        .expect("b unenrolled");
    let certs = s.node.cert_serials().unwrap();
    assert!(
        !certs.contains_key("spiffe://cluster.local/ns/default/sa/b"),
        "{certs:?}"
    );
    let status = s.cp.status().unwrap();
    assert_eq!(
        status["nodes"]["n1"]["acked_version"], status["config"]["version"],
        "{status}"
    );
}

#[test]
fn node_keeps_its_config_while_the_control_plane_is_away_and_resyncs_when_it_returns() {
    let mut s = setup("outage");
    s.cp.pause().unwrap();
    s.node
        .wait_for(T, |st| st["cp_connected"] == 0)
        .expect("node notices the outage");
    // A stop in order is told as such, and what follows says each cause once: before, the
    // node logged "h2 protocol error: ... without sending TLS close_notify: https://docs.rs/…"
    // and "tcp connect error: transport error: tcp connect error: tcp connect error".
    let log = s
        .node
        .wait_log(T, "Connection refused")
        .expect("a refused reconnect");
    assert!(
        log.contains(
            "control plane is shutting down (a restart or an upgrade); keeping the last config"
        ),
        "{log}"
    );
    for fault in [
        "h2 protocol error",
        "https://",
        "tcp connect error: tcp connect error",
    ] {
        assert!(!log.contains(fault), "{fault:?} in\n{log}");
    }
    // While it is away for 30 s: known workloads stay enrolled and keep talking.
    let away = std::time::Instant::now();
    s.cp.write_config("c.yaml", &workloads_yaml(&[s.topo.pod("c")]))
        .unwrap();
    while away.elapsed() < Duration::from_secs(30) {
        call_b(&s);
        assert_eq!(s.node.stat("enrolled_workloads"), 2);
        std::thread::sleep(Duration::from_secs(5));
    }
    assert!(s.node.log().contains("keeping the last config"));

    s.cp.resume().unwrap();
    s.node
        .wait_for(T, |st| {
            st["cp_connected"] == 1 && st["enrolled_workloads"] == 3 && st["svids"] == 3
        })
        .expect("node resyncs with the change made during the outage");
    call_b(&s);
}

/// A first sync larger than gRPC's 4 MiB message limit (every workload of the mesh goes to
/// every node) reaches the node in parts and is applied whole: before parts, the node refused
/// the message and reconnected for ever.
#[test]
fn a_first_sync_over_the_grpc_message_limit_is_applied() {
    // Few enough for a debug build of mesh-cp to load in seconds; labels make them large.
    const OTHERS: u32 = 10_000;
    let labels: Vec<(String, String)> = (0..5)
        .map(|k| (format!("label-{k}"), format!("{}{k}", "v".repeat(60))))
        .collect();
    let label_yaml: String = labels.iter().map(|(k, v)| format!(", {k}: {v}")).collect();
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["a", "b"])]).expect("topology");
    let mut yaml = workloads_yaml(&[topo.pod("a"), topo.pod("b")]);
    for i in 0..OTHERS {
        let (hi, lo) = (i >> 8, i & 0xff);
        yaml.push_str(&format!(
            "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: other-{i}, labels: {{app: other-{i}{label_yaml}}}}}\nspec: {{node: elsewhere, netns: /run/netns/other-{i}, addresses: ['172.16.{hi}.{lo}'], serviceAccount: other-workload-{i}}}\n"
        ));
    }
    // What one of them takes on the wire, at the least: together more than the limit.
    let one = mesh_api::v1::Resource {
        key: "workload/default/other-00000".into(),
        kind: Some(mesh_api::v1::resource::Kind::Workload(
            mesh_api::v1::Workload {
                namespace: "default".into(),
                name: "other-00000".into(),
                node: "elsewhere".into(),
                addresses: vec![vec![172, 16, 0, 0]],
                identity: "spiffe://cluster.local/ns/default/sa/other-workload-00000".into(),
                labels: labels.iter().cloned().collect(),
                ..Default::default()
            },
        )),
    };
    let least = prost::Message::encoded_len(&one) * OTHERS as usize;
    assert!(least > 4 << 20, "the sync must be over the limit: {least}");
    let cp = ControlPlane::start(
        &format!("{}-large-sync", topo.prefix),
        &[("workloads.yaml", &yaml)],
    )
    .expect("mesh-cp");
    let mut node =
        MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node follows the control plane");
    let expected = format!("workloads={}", OTHERS + 2);
    node.wait_log(Duration::from_secs(60), &expected)
        .expect("the snapshot with every workload was applied");
    assert!(!node.log().contains("length too large"), "{}", node.log());
}

/// A node that loses its stream and comes back names the version it holds, and is sent only
/// what changed meanwhile: counted on the wire between them, where before the change it took
/// a whole snapshot again.
#[test]
fn a_node_that_reconnects_is_sent_only_what_changed() {
    const OTHERS: u32 = 2_000;
    let other = |i: u32| {
        let (hi, lo) = (i >> 8, i & 0xff);
        format!("---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: other-{i}, labels: {{app: other-{i}}}}}\nspec: {{node: elsewhere, netns: /run/netns/other-{i}, addresses: ['172.16.{hi}.{lo}']}}\n")
    };
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["a", "b"])]).expect("topology");
    let mut yaml = workloads_yaml(&[topo.pod("a"), topo.pod("b")]);
    yaml.extend((0..OTHERS).map(other));
    let cp = ControlPlane::start(
        &format!("{}-resume", topo.prefix),
        &[("workloads.yaml", &yaml)],
    )
    .expect("mesh-cp");
    let relay = Relay::start(cp.grpc).expect("relay");
    let mut node = MeshNode::join_via(&mut topo, "n1", &cp, relay.addr, 2, &[]).expect("mesh-node");
    let snapshot = relay.received();
    assert_eq!(snapshot.len(), 1, "one stream so far: {snapshot:?}");

    // Cut off, the node misses one workload being added.
    relay.hold(true);
    relay.cut();
    node.wait_for(T, |s| s["cp_connected"] == 0)
        .expect("the node sees its stream gone");
    let before = cp.version().expect("version");
    cp.write_config("added.yaml", &other(OTHERS))
        .expect("write");
    let deadline = std::time::Instant::now() + T;
    while cp.version().expect("version") == before {
        assert!(
            std::time::Instant::now() < deadline,
            "mesh-cp never took the change"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.hold(false);
    node.wait_log(T, "config stream resumed")
        .expect("the node resumed");
    node.wait_for(T, |s| s["cp_connected"] == 1)
        .expect("connected again");
    assert!(
        node.log().contains(&format!("workloads={}", OTHERS + 3)),
        "the added workload arrived: {}",
        node.log()
    );

    let received = relay.received();
    let resumed = *received.last().expect("a second stream");
    assert!(
        resumed * 20 < snapshot[0],
        "the resumed stream carried {resumed} bytes, the first {}: {received:?}",
        snapshot[0]
    );
    let metrics = mesh_tests::mesh::http_get(cp.metrics, "/metrics").expect("cp metrics");
    let metrics = mesh_tests::prom::Exposition::parse(&metrics).expect("parse");
    let pushes = |kind| metrics.sum("mycel_cp_config_pushes_total", &[("kind", kind)]);
    assert_eq!(pushes("snapshot"), 1.0, "one snapshot, on the first stream");
    assert_eq!(pushes("resume"), 1.0);
    let sent = metrics.sum(
        "mycel_cp_config_resources_sent_total",
        &[("kind", "resume")],
    );
    assert!(
        (1.0..=2.0).contains(&sent),
        "the workload (and nothing else that did not change): {sent}"
    );
}

/// A node that reaches mesh-cp by a name its serving certificate lacks (here an IPv4-mapped
/// IPv6 address of its loopback address) is told the names the certificate has and how to
/// add one, and gets nothing until then.
#[test]
fn a_control_plane_name_missing_from_its_certificate_is_named_with_the_fix() {
    let topo = Topology::new(&[NodeSpec::new("n1", &["a"])]).expect("topology");
    let cp = ControlPlane::start(
        &format!("{}-name", topo.prefix),
        &[("workloads.yaml", &workloads_yaml(&[topo.pod("a")]))],
    )
    .expect("mesh-cp");
    let mapped: std::net::SocketAddr = format!("[::ffff:127.0.0.1]:{}", cp.grpc.port())
        .parse()
        .expect("an address");
    let mut node =
        MeshNode::connect_to(topo.node("n1"), &cp, mapped, None, &[]).expect("mesh-node");
    let log = node
        .wait_log(T, "certificate not valid for name")
        .expect("the handshake refused");
    let line = log
        .lines()
        .find(|l| l.contains("certificate not valid for name"))
        .unwrap_or_default();
    assert!(
        line.contains("control plane unavailable")
            && line.contains("\"::ffff:127.0.0.1\"")
            && line.contains("IpAddress(127.0.0.1)")
            && line.contains("mesh-cp serve --server-name NAME"),
        "{line}"
    );
    assert_eq!(node.stat("cp_connected"), 0);
}
