//! Traffic capture in the real kernel: connects from enrolled pods are steered by the eBPF
//! programs into mesh-node's proxy, which recovers the original destination and forwards.

use std::time::Duration;

use mesh_tests::{
    app::{self, Server},
    mesh::workloads_yaml,
    MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

mesh_tests::on_both_local_hops!(
    client_reaches_server_through_proxy_with_original_peer_and_intact_payload,
    non_enrolled_namespace_or_cgroup_connects_directly,
    closed_port_resets_client_quickly,
    ten_thousand_connections_leave_no_original_destination_entries,
    full_original_destination_map_is_counted_and_connections_are_reset,
);

/// One node with pods a, b (enrolled) and c (not enrolled); mesh-node runs inside the node's
/// cgroup, so its own upstream connects pass through the hooks too.
fn setup() -> (Topology, MeshNode, Server) {
    let mut topo = Topology::new(&[NodeSpec::new("n0", &["a", "b", "c"])]).expect("topology");
    let daemon_cg = topo
        .add_cgroup_below(&topo.node("n0").cgroup.clone(), "mesh-node")
        .expect("daemon cgroup");
    let server = Server::start(topo.pod("b"), PORT).expect("server in b");
    let yaml = workloads_yaml(&[topo.pod("a"), topo.pod("b")]);
    let mut node =
        MeshNode::start(topo.node("n0"), &yaml, Some(&daemon_cg), &[]).expect("mesh-node");
    node.wait_enrolled(2).expect("enrolled");
    (topo, node, server)
}

fn client_reaches_server_through_proxy_with_original_peer_and_intact_payload() {
    let (topo, node, _server) = setup();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let size = 12 * 1024 * 1024;

    for (host, url_host) in [
        (b.ipv4.to_string(), b.ipv4.to_string()),
        (b.ipv6.to_string(), format!("[{}]", b.ipv6)),
    ] {
        let before = node.stats().unwrap();
        let out = app::run(
            a,
            &["get", &format!("http://{url_host}:{PORT}/blob/{size}")],
            T,
        );
        let expected = {
            // The same pattern app.py serves, hashed here independently.
            let pattern: Vec<u8> = (0..251u32).map(|i| ((i * 37 + 11) % 256) as u8).collect();
            let data: Vec<u8> = pattern.iter().copied().cycle().take(size).collect();
            sha256_hex(&data)
        };
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["len"], size, "{out}");
        assert_eq!(out["sha256"], expected, "payload corrupted: {out}");
        // getpeername shows B, not the proxy's loopback listener.
        assert_eq!(out["peer"][0], host, "{out}");
        assert_eq!(out["peer"][1], PORT, "{out}");

        let after = node.stats().unwrap();
        let d = |k: &str| after[k] - before[k];
        assert_eq!(d("ebpf_redirected"), 1, "exactly one redirect: {after:?}");
        assert_eq!(d("proxy_forwarded"), 1, "{after:?}");
        // The proxy's own upstream connect went through the hook and was let through by mark.
        assert_eq!(d("ebpf_skipped_proxy"), 1, "no loop: {after:?}");
        assert!(d("proxy_bytes_received") >= size as u64, "{after:?}");
        // Both directions of the application's connection to the proxy decided their path
        // once, on their first send.
        let decided = d("ebpf_hop_direct") + d("ebpf_hop_tcp");
        let expected = if mesh_tests::mesh::local_hop() == Some("sockmap") {
            2
        } else {
            0
        };
        assert_eq!(decided, expected, "{after:?}");
    }
    node.assert_local_hop();

    // B saw the connection coming from A's address (the proxy connects from A's netns).
    let who = app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(who["body"], a.ipv4.to_string(), "{who}");
}

fn non_enrolled_namespace_or_cgroup_connects_directly() {
    let (topo, node, _server) = setup();
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let before = node.stats().unwrap();

    // Pod c is under the node's cgroup but its netns is not enrolled.
    let out = app::run(c, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(out["body"], c.ipv4.to_string(), "{out}");
    assert_eq!(out["peer"][0], b.ipv4.to_string(), "{out}");
    let mid = node.stats().unwrap();
    assert_eq!(mid["ebpf_redirected"], before["ebpf_redirected"], "{mid:?}");
    assert_eq!(
        mid["ebpf_skipped_not_enrolled"],
        before["ebpf_skipped_not_enrolled"] + 1,
        "{mid:?}"
    );

    // A process in pod a's (enrolled) netns but outside the node's cgroup is not seen at all.
    let out = app::run_where(
        &a.netns_path(),
        None,
        &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)],
        T,
    );
    assert_eq!(out["body"], a.ipv4.to_string(), "{out}");
    let after = node.stats().unwrap();
    assert_eq!(
        after["ebpf_redirected"], mid["ebpf_redirected"],
        "{after:?}"
    );
    assert_eq!(after["proxy_accepted"], mid["proxy_accepted"], "{after:?}");
}

fn closed_port_resets_client_quickly() {
    let (topo, node, _server) = setup();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    for host in [b.ipv4.to_string(), b.ipv6.to_string()] {
        let out = app::run(a, &["probe", &host, "9999"], T);
        assert_eq!(
            out["outcome"], "reset",
            "a failure must look like a failure: {out}"
        );
        assert!(out["seconds"].as_f64().unwrap() < 1.0, "{out}");
    }
    assert_eq!(node.stat("proxy_upstream_failed"), 2);
}

fn ten_thousand_connections_leave_no_original_destination_entries() {
    let (topo, node, _server) = setup();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let out = app::run(
        a,
        &["loop", &b.ipv4.to_string(), &PORT.to_string(), "10000"],
        Duration::from_secs(600),
    );
    assert_eq!(out["failures"], 0, "{out}");
    assert!(node.stat("ebpf_redirected") >= 10_000);
    assert_eq!(node.stat("ebpf_map_full"), 0);
    let mut node = node;
    node.wait_for(Duration::from_secs(10), |s| {
        s["orig_dst_entries_by_cookie"] == 0 && s["orig_dst_entries_by_tuple"] == 0
    })
    .expect("original-destination maps drain once the connections are closed");
}

fn full_original_destination_map_is_counted_and_connections_are_reset() {
    let topo = Topology::new(&[NodeSpec::new("n0", &["a", "b"])]).expect("topology");
    let _server = Server::start(topo.pod("b"), PORT).expect("server");
    let yaml = workloads_yaml(&[topo.pod("a"), topo.pod("b")]);
    let mut node = MeshNode::start(topo.node("n0"), &yaml, None, &["--orig-dst-capacity", "4"])
        .expect("mesh-node");
    node.wait_enrolled(2).unwrap();
    // Hold 12 connections open at once from pod a: more than the map can track.
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let v = app::run(
        a,
        &["hold", &b.ipv4.to_string(), &PORT.to_string(), "12"],
        T,
    );
    assert!(v["failed"].as_u64().unwrap() > 0, "{v}");
    assert!(v["ok"].as_u64().unwrap() > 0, "{v}");
    let s = node.stats().unwrap();
    assert!(s["ebpf_map_full"] > 0, "map-full must be counted: {s:?}");
    assert_eq!(
        s["proxy_no_orig_dst"],
        v["failed"].as_u64().unwrap(),
        "{s:?}"
    );
    assert!(
        node.log().contains("no original destination"),
        "{}",
        node.log()
    );
}

/// With the daemon in a cgroup beside the pods' (not below the captured one), the proxy's
/// hop sockets still join the socket map as they are established: `sock_ops` runs on the
/// daemon's own cgroup too, from when the hop is turned on. Both directions of the
/// application's connection to the proxy then go socket to socket, and the bytes arrive
/// intact.
#[test]
fn a_daemon_beside_the_pods_cgroup_puts_its_hop_sockets_in_the_map() {
    mesh_tests::mesh::with_local_hop("sockmap", || {
        let topo = Topology::new(&[NodeSpec::new("n0", &["a", "b"])]).expect("topology");
        let _server = Server::start(topo.pod("b"), PORT).expect("server");
        let yaml = workloads_yaml(&[topo.pod("a"), topo.pod("b")]);
        let mut node = MeshNode::start(topo.node("n0"), &yaml, None, &[]).expect("mesh-node");
        node.wait_enrolled(2).unwrap();
        let (a, b) = (topo.pod("a"), topo.pod("b"));
        let size = 4 * 1024 * 1024;
        let before = node.stats().unwrap();
        let out = app::run(
            a,
            &["get", &format!("http://{}:{PORT}/blob/{size}", b.ipv4)],
            T,
        );
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["len"], size, "{out}");
        let after = node.stats().unwrap();
        let d = |k: &str| after[k] - before[k];
        // The proxy's socket decided too (had it not joined, only the application's would
        // have, by TCP), and its answer went direct. The application's request goes direct
        // unless it was sent before the proxy's socket joined (then TCP, for good).
        let (direct, tcp) = (d("ebpf_hop_direct"), d("ebpf_hop_tcp"));
        assert!(
            direct >= 1 && direct + tcp == 2,
            "{after:?}\n{}",
            node.log()
        );
        assert_eq!(d("ebpf_hop_full"), 0, "{after:?}");
    });
}

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
