//! mesh-node restarts without leaving its pods unprotected: the capture is pinned, so while no
//! daemon runs an enrolled pod's connects are refused (nothing leaves in plaintext) and STRICT
//! keeps dropping plaintext to its pods; the next daemon takes the pins over.

use std::{path::Path, process::Command, time::Duration, time::Instant};

use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, mesh_node_bin, run_alone, service_yaml, workloads_yaml},
    wire::{self, Tcpdump},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";
const VIP_PORT: u16 = 80;
const T: Duration = Duration::from_secs(60);

/// `app.py probe` from `from` to `host:port`: what the connect came to.
fn probe(topo: &Topology, from: &str, host: &str, port: u16) -> String {
    let out = app::run(topo.pod(from), &["probe", host, &port.to_string()], T);
    out["outcome"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn after_a_crash_pods_fail_closed_until_the_next_daemon_takes_over() {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client"]),
        NodeSpec::new("n2", &["server", "outside"]),
    ])
    .expect("topology");
    let _servers = [
        Server::start(topo.pod("server"), PORT).expect("server app"),
        Server::start(topo.pod("outside"), PORT).expect("outside app"),
    ];
    let yaml = format!(
        "{}---\n{}---\n{}",
        workloads_yaml(&[topo.pod("client"), topo.pod("server")]),
        service_yaml("web", VIP, VIP_PORT, PORT, "server"),
        mesh_config_yaml("tls", "mtls: { mode: Strict }"),
    );
    let name = format!("{}-restart", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let mut n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1");
    let mut n2 = MeshNode::join(&mut topo, "n2", &cp, 1).expect("mesh-node n2");
    let server = topo.pod("server").clone();
    let (server_v4, server_v6) = (server.ipv4.to_string(), server.ipv6.to_string());
    let get = |topo: &Topology, url: &str| app::run(topo.pod("client"), &["get", url], T);
    let through_mesh = |topo: &Topology| {
        for url in [
            format!("http://{server_v4}:{PORT}/whoami"),
            format!("http://{VIP}:{VIP_PORT}/whoami"),
        ] {
            let out = get(topo, &url);
            assert_eq!(out["status"], 200, "{url}: {out}");
        }
    };
    through_mesh(&topo);
    // STRICT with the daemons up: plaintext from outside the mesh is dropped.
    assert_eq!(probe(&topo, "outside", &server_v4, PORT), "timeout");

    let window = uplink_capture(&topo, "window");

    // Both daemons crash.
    n1.stop_with(libc::SIGKILL).expect("kill n1");
    n2.stop_with(libc::SIGKILL).expect("kill n2");
    // The client's connects are refused at once, by pod address (v4, v6) and by VIP, rather
    // than sent around the mesh.
    for (host, port) in [
        (server_v4.as_str(), PORT),
        (server_v6.as_str(), PORT),
        (VIP, VIP_PORT),
    ] {
        assert_eq!(probe(&topo, "client", host, port), "refused", "{host}");
    }
    // STRICT keeps dropping plaintext to the server.
    assert_eq!(probe(&topo, "outside", &server_v4, PORT), "timeout");
    assert_eq!(probe(&topo, "outside", &server_v6, PORT), "timeout");

    // The next daemons take over: time from start to ready (enrolled, certificates, control
    // plane connected).
    let started = Instant::now();
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1 again");
    let n1_ready = started.elapsed();
    let started = Instant::now();
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 1).expect("mesh-node n2 again");
    let n2_ready = started.elapsed();
    println!(
        "time to ready after kill -9: n1 {} ms, n2 {} ms",
        n1_ready.as_millis(),
        n2_ready.as_millis()
    );
    for node in [&n1, &n2] {
        let log = node.log();
        assert!(
            log.contains("adopted_maps=true") && log.contains("links_taken_over=5"),
            "{log}"
        );
    }
    assert!(
        n2.log().contains("inbound_taken_over=1"),
        "the server's inbound link was taken over:\n{}",
        n2.log()
    );
    through_mesh(&topo);
    assert_eq!(probe(&topo, "outside", &server_v4, PORT), "timeout");
    // Nothing of the client's crossed n1's uplink but tunnel traffic, daemons or none.
    let window = window.finish().expect("tcpdump stopped");
    assert_eq!(
        leaked(&topo, &window),
        0,
        "plaintext left n1 while no daemon ran"
    );

    // The control that shows the capture would have seen a leak: with the capture removed
    // from n1, the client's SYN to the server's port crosses the uplink in plaintext.
    let mut n1 = n1;
    n1.stop_with(libc::SIGTERM).expect("stop n1");
    assert_eq!(probe(&topo, "client", &server_v4, PORT), "refused");
    let node = topo.node("n1").clone();
    let mut uninstall = Command::new(mesh_node_bin());
    uninstall
        .args(["uninstall", "--node-name", "n1", "--cgroup"])
        .arg(&node.cgroup)
        .arg("--bpffs")
        .arg(&node.bpffs);
    let out = run_alone(&node, &mut uninstall).expect("mesh-node uninstall");
    assert!(out.status.success(), "{out:?}");
    // The server is STRICT and its daemon up: the SYN is dropped there, after the uplink.
    let control = uplink_capture(&topo, "control");
    assert_eq!(probe(&topo, "client", &server_v4, PORT), "timeout");
    let control = control.finish().expect("tcpdump stopped");
    assert!(
        leaked(&topo, &control) >= 1,
        "the control's plaintext SYN is on the wire"
    );
    for pcap in [window, control] {
        let _ = std::fs::remove_file(&pcap);
        let _ = std::fs::remove_file(pcap.with_extension("log"));
    }
    drop((n1, n2, cp));
}

/// A capture on n1's uplink.
fn uplink_capture(topo: &Topology, name: &str) -> Tcpdump {
    let netns = Path::new("/run/netns").join(&topo.node("n1").netns);
    let pcap = std::env::temp_dir().join(format!("{}-{name}.pcap", topo.prefix));
    Tcpdump::start(&netns, mesh_tests::topology::UPLINK, &pcap).expect("tcpdump on n1's uplink")
}

/// TCP packets from the client pod to anything but the tunnel port: what would have left
/// around the mesh.
fn leaked(topo: &Topology, pcap: &Path) -> usize {
    let client = topo.pod("client");
    let filter = format!(
        "tcp && (ip.src == {} || ipv6.src == {}) && tcp.dstport != 15008",
        client.ipv4, client.ipv6
    );
    wire::tshark(pcap, &["-Y", &filter])
        .expect("tshark")
        .lines()
        .count()
}
