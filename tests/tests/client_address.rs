//! The destination application sees its real client: a connection through the mesh reaches it
//! from the source pod's address (IPv4 and IPv6, across nodes on both transports and between
//! pods of one node), through the return routing mesh-node sets up in the pod's netns, and
//! takes away again when the pod leaves the mesh.

use std::{process::Command, time::Duration};

use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, service_yaml, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Pod, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";
const VIP_PORT: u16 = 80;
const T: Duration = Duration::from_secs(60);
/// mesh-node's return routing table and rule priority (`transparent::TABLE`).
const TABLE: &str = "19779";

mesh_tests::on_both_transports!(the_application_sees_the_source_pod_and_nothing_is_left_after,);

/// One node where `client` and `server` are in the mesh (with `mesh_spec` in its MeshConfig)
/// and `outside` is not; the server's application listens on PORT. mesh-node runs with `args`.
struct OneNode {
    n1: MeshNode,
    _cp: ControlPlane,
    _server: Server,
    client: Pod,
    server: Pod,
    outside: Pod,
    /// Last, so it is dropped last: the daemon stops before the topology goes.
    _topo: Topology,
}

fn one_node(test: &str, mesh_spec: &str, args: &[&str]) -> OneNode {
    let mut topo =
        Topology::new(&[NodeSpec::new("n1", &["client", "server", "outside"])]).expect("topology");
    let server_app = Server::start(topo.pod("server"), PORT).expect("server app");
    let (client, server, outside) = (
        topo.pod("client").clone(),
        topo.pod("server").clone(),
        topo.pod("outside").clone(),
    );
    let yaml = format!(
        "{}---\n{}",
        workloads_yaml(&[&client, &server]),
        mesh_config_yaml("tls", mesh_spec),
    );
    let name = format!("{}-{test}", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let n1 = MeshNode::join_with(&mut topo, "n1", &cp, 2, args).expect("mesh-node n1");
    OneNode {
        n1,
        _cp: cp,
        _server: server_app,
        client,
        server,
        outside,
        _topo: topo,
    }
}

/// Where the return routing cannot be made (here: no sysctls where mesh-node is told to write
/// them), the pod is enrolled all the same, its application sees the pod's own address as it
/// did before, the metric says how many pods are in that state, and nothing half-made is left.
#[test]
fn without_return_routing_the_application_sees_its_own_address() {
    // A directory no test makes: the name of one that exists nowhere.
    let missing = std::env::temp_dir().join(format!("mycel-no-sysctls-{}", std::process::id()));
    let m = one_node(
        "no-return-routing",
        "",
        &["--net-sysctl-dir", &missing.to_string_lossy()],
    );
    let (n1, client, server) = (&m.n1, &m.client, &m.server);
    let url = format!("http://{}:{PORT}/whoami", server.ipv4);
    let out = app::run(client, &["get", &url], T);
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"], server.ipv4.to_string(), "{out}");
    assert_eq!(n1.stat("without_client_address"), 2);
    assert!(
        n1.log()
            .contains("will see connections from the pod's own address"),
        "{}",
        n1.log()
    );
    for pod in [client, server] {
        let (rules, routes, _) = return_routing(pod);
        assert_eq!((rules.as_str(), routes.as_str()), ("", ""), "{}", pod.name);
    }
}

/// `ip ARGS` in `pod`'s netns; its output.
fn ip_in(pod: &Pod, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &pod.netns])
        .args(args)
        .output()
        .expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pod netns's sysctls that mesh-node turns on: `tcp_fwmark_accept` and both
/// `fwmark_reflect`s, one value per line.
fn sysctls(pod: &Pod) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "cat"])
        .args([
            "/proc/sys/net/ipv4/tcp_fwmark_accept",
            "/proc/sys/net/ipv4/fwmark_reflect",
            "/proc/sys/net/ipv6/fwmark_reflect",
        ])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What mesh-node's return routing leaves in `pod`'s netns: its rules and routes, both
/// families, and the sysctl.
fn return_routing(pod: &Pod) -> (String, String, String) {
    let rules = [ip_in(pod, &["-4", "rule"]), ip_in(pod, &["-6", "rule"])]
        .join("")
        .lines()
        .filter(|l| l.contains(&format!("lookup {TABLE}")))
        .map(|l| format!("{l}\n"))
        .collect();
    let routes = [
        ip_in(pod, &["-4", "route", "show", "table", "all"]),
        ip_in(pod, &["-6", "route", "show", "table", "all"]),
    ]
    .join("")
    .lines()
    .filter(|l| l.contains(&format!("table {TABLE}")))
    .map(|l| format!("{l}\n"))
    .collect();
    (rules, routes, sysctls(pod))
}

/// n1 runs `client`; n2 runs `server` and `neighbour`, a client on the server's node. The
/// service `web` is VIP:80 → server:8080.
fn the_application_sees_the_source_pod_and_nothing_is_left_after(transport: &str) {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client"]),
        NodeSpec::new("n2", &["server", "neighbour"]),
    ])
    .expect("topology");
    let _server = Server::start(topo.pod("server"), PORT).expect("server app");
    let (client, server, neighbour) = (
        topo.pod("client").clone(),
        topo.pod("server").clone(),
        topo.pod("neighbour").clone(),
    );
    let mesh = |pods: &[&Pod]| {
        format!(
            "{}---\n{}---\n{}",
            workloads_yaml(pods),
            service_yaml("web", VIP, VIP_PORT, PORT, "server"),
            mesh_config_yaml(transport, ""),
        )
    };
    let all = mesh(&[&client, &server, &neighbour]);
    let name = format!("{}-client-address-{transport}", topo.prefix);
    let mut cp = ControlPlane::start(&name, &[("mesh.yaml", &all)]).expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1");
    let mut n2 = MeshNode::join_with(&mut topo, "n2", &cp, 2, &["--access-log", "all"])
        .expect("mesh-node n2");

    let whoami = |from: &Pod, host: &str, port: u16| {
        let out = app::run(from, &["get", &format!("http://{host}:{port}/whoami")], T);
        assert_eq!(
            out["status"], 200,
            "{host}:{port} from {}: {out}",
            from.name
        );
        out["body"].as_str().unwrap_or_default().to_string()
    };
    let v6 = |ip: std::net::Ipv6Addr| format!("[{ip}]");
    for (from, host, port, seen) in [
        // Across nodes, through the tunnel: by pod address, both families, and by VIP.
        (
            &client,
            server.ipv4.to_string(),
            PORT,
            client.ipv4.to_string(),
        ),
        (&client, v6(server.ipv6), PORT, client.ipv6.to_string()),
        (&client, VIP.to_string(), VIP_PORT, client.ipv4.to_string()),
        // Between two pods of one node, without a tunnel.
        (
            &neighbour,
            server.ipv4.to_string(),
            PORT,
            neighbour.ipv4.to_string(),
        ),
        (
            &neighbour,
            v6(server.ipv6),
            PORT,
            neighbour.ipv6.to_string(),
        ),
    ] {
        assert_eq!(
            whoami(from, &host, port),
            seen,
            "{host}:{port} from {}\nn2 log:\n{}",
            from.name,
            n2.log()
        );
    }
    assert!(n1.stat("tunnels_out") >= 2, "the tunnel was used");
    assert_eq!(n2.stat("without_client_address"), 0);

    // The access log names the source as before (a line is written when its connection
    // ends, which the destination may see a little after the client).
    let from_client = |e: &serde_json::Value| {
        e["reporter"] == "destination"
            && e["source_address"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{}:", client.ipv4)))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !n2.access_log().expect("access log").iter().any(from_client) {
        assert!(
            std::time::Instant::now() < deadline,
            "no access log line from the client:\n{:?}",
            n2.access_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The return routing is in place while the pod is in the mesh...
    let (rules, routes, mark) = return_routing(&server);
    assert_eq!(rules.lines().count(), 2, "one rule per family:\n{rules}");
    assert_eq!(routes.lines().count(), 2, "one route per family:\n{routes}");
    assert!(routes.contains("local default dev lo"), "{routes}");
    assert_eq!(mark, "1\n1\n1\n");
    // ... and while a connection into the pod is open after the pod left (a TLS tunnel runs
    // to its end; a pod's QUIC connections end with its endpoint): the application's answers
    // still need the route back.
    let lingering = (transport == "tls").then(|| {
        let host = server.ipv4.to_string();
        app::start(&client, &["linger", &host, &PORT.to_string(), "4"]).expect("linger")
    });
    if lingering.is_some() {
        std::thread::sleep(Duration::from_secs(1));
    }
    cp.apply("mesh.yaml", &mesh(&[&client, &neighbour]), &["n2"])
        .expect("server leaves the mesh");
    n2.wait_enrolled(1).expect("server unenrolled");
    if let Some(child) = lingering {
        assert_eq!(
            return_routing(&server).0.lines().count(),
            2,
            "kept for the open connection"
        );
        let out = app::finish(child, T);
        assert_eq!(out["failed"], 0, "{out}");
        assert!(out["error"].is_null(), "{out}");
        assert!(out["rounds"].as_u64() >= Some(6), "{out}");
    }
    // ... and nothing of it once the pod has left and its last connection ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !return_routing(&server).0.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = return_routing(&server);
    assert_eq!(
        left,
        (String::new(), String::new(), "0\n0\n0\n".to_string()),
        "left in the netns of a pod that left the mesh"
    );
    // The neighbour, still in the mesh, keeps its own.
    assert_eq!(return_routing(&neighbour).0.lines().count(), 2);
}

/// PERMISSIVE: plaintext from outside the mesh reaches the application from its client's
/// address too. And what reaches the application's side of a connection the proxy made from a
/// client's address by way of an interface is forged (the real segments come from the proxy,
/// over the pod's loopback): the inbound program drops it, and a SYN that would repeat that
/// connection's addresses and ports, so the connection carries on untouched.
#[test]
fn plaintext_sees_its_client_and_forged_segments_do_not_reach_the_application() {
    let m = one_node("forged", "mtls: { mode: Permissive }", &[]);
    let (n1, client, server, outside) = (&m.n1, &m.client, &m.server, &m.outside);

    // Plaintext from outside the mesh, both families.
    let v6 = |ip: std::net::Ipv6Addr| format!("[{ip}]");
    for (host, seen) in [
        (server.ipv4.to_string(), outside.ipv4.to_string()),
        (v6(server.ipv6), outside.ipv6.to_string()),
    ] {
        let url = format!("http://{host}:{PORT}/whoami");
        let out = app::run(outside, &["get", &url], T);
        assert_eq!(out["status"], 200, "{url}: {out}");
        assert_eq!(out["body"], seen, "{url}: {out}\n{}", n1.log());
    }
    assert!(n1.stat("ebpf_inbound_steered") >= 2, "it came as plaintext");

    // For each family: a connection from client to server, open for 6 s, whose application
    // side has the client's address and a port of the proxy's; then someone else sends
    // segments with that connection's addresses and ports, by the wire.
    for (host, client_ip) in [
        (server.ipv4.to_string(), client.ipv4.to_string()),
        (server.ipv6.to_string(), client.ipv6.to_string()),
    ] {
        let linger =
            app::start(client, &["linger", &host, &PORT.to_string(), "6"]).expect("linger");
        std::thread::sleep(Duration::from_secs(1));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.netns,
                "ss",
                "-Htn",
                "state",
                "established",
            ])
            .arg(format!("( sport = :{PORT} )"))
            .output()
            .expect("ss");
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let peer_port = listed
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .find_map(|peer| {
                // A dual-stack listener shows IPv4 peers as mapped addresses.
                let peer = peer.trim_start_matches('[');
                let peer = peer.strip_prefix("::ffff:").unwrap_or(peer);
                peer.strip_prefix(client_ip.as_str())?
                    .trim_start_matches(']')
                    .strip_prefix(':')
            })
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no connection from {client_ip}:\n{listed}"));

        let before = n1.stats().expect("stats");
        let forged = app::run(
            outside,
            &[
                "forge",
                &client_ip,
                &peer_port.to_string(),
                &host,
                &PORT.to_string(),
            ],
            T,
        );
        assert_eq!(forged["sent"], 3, "{forged}");
        let d = |after: &std::collections::BTreeMap<String, u64>, k: &str| after[k] - before[k];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let after = loop {
            let after = n1.stats().expect("stats");
            if d(&after, "ebpf_inbound_spoofed") >= 2 || std::time::Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            d(&after, "ebpf_inbound_spoofed"),
            2,
            "{host}: the ACK and the RST: {after:?}"
        );
        assert_eq!(
            d(&after, "ebpf_inbound_tuple_in_use"),
            1,
            "{host}: the SYN: {after:?}"
        );
        let out = app::finish(linger, T);
        assert_eq!(out["failed"], 0, "{host}: {out}");
        assert!(out["error"].is_null(), "{host}: {out}");
    }
}

/// A connection that cannot be made from its source's address (here: the server's netns has
/// two source ports, and three connections from one client are open at once) is made from
/// the pod's own address instead, and counted; none fails.
#[test]
fn without_a_free_source_port_the_pods_address_is_used_and_counted() {
    let m = one_node("no-port", "", &[]);
    let (n1, client, server) = (&m.n1, &m.client, &m.server);
    let narrowed = Command::new("ip")
        .args(["netns", "exec", &server.netns, "sysctl", "-q", "-w"])
        .arg("net.ipv4.ip_local_port_range=40000 40001")
        .status()
        .expect("sysctl");
    assert!(narrowed.success());
    let out = app::run(
        client,
        &["hold", &server.ipv4.to_string(), &PORT.to_string(), "3"],
        T,
    );
    assert_eq!(out["ok"], 3, "{out}\n{}", n1.log());
    let fell_back = n1.stat("delivered_from_own_address");
    assert!((1..=2).contains(&fell_back), "{fell_back} of 3");
}
