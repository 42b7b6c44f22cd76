//! Two nodes following one control plane. Pod-to-pod traffic between the nodes goes through
//! the mTLS tunnel (checked on the wire), a service VIP reaches its endpoint, the destination
//! refuses tunnel clients it cannot verify, and certificates rotate under open connections.
//! Each test runs on both transports (`tls::` and `quic::`), chosen by the mesh's MeshConfig.

use std::{path::Path, time::Duration};

use mesh_api::v1::{tunnel_response::Status, TunnelRequest};
use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, service_yaml, workloads_yaml},
    tunnel::{describe, dial, dial_quic, TestCa},
    wire::{self, Tcpdump},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";
const VIP_PORT: u16 = 80;
/// Just over 10 MiB, so the last segment is a partial one.
const BLOB: usize = 10 * 1024 * 1024 + 7;
const T: Duration = Duration::from_secs(60);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

struct Mesh {
    cp: ControlPlane,
    n1: MeshNode,
    n2: MeshNode,
    _servers: Vec<Server>,
    /// Last, so it is dropped last: the daemons stop cleanly (releasing their cgroup
    /// claims) before the topology's teardown kills whatever runs in its cgroups.
    topo: Topology,
}

mesh_tests::on_both_transports!(
    pod_to_pod_across_nodes_goes_through_the_tunnel_intact_and_encrypted,
    half_close_and_resets_cross_the_tunnel,
    the_destination_refuses_tunnel_clients_it_cannot_verify_and_says_why,
    certificates_rotate_under_a_long_lived_connection,
    tunnels_keep_working_while_the_control_plane_is_away,
    a_server_that_answers_and_closes_at_once_loses_nothing,
);

/// n1 runs `client`; n2 runs `server` and `outside` (not in the mesh). Servers listen on
/// PORT in `server` and `outside`; the service `web` is VIP:80 → server:8080. The mesh uses
/// `transport`, with `mesh_spec` added to its MeshConfig spec.
fn mesh(test: &str, transport: &str, mesh_spec: &str) -> Mesh {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client"]),
        NodeSpec::new("n2", &["server", "outside"]),
    ])
    .expect("topology");
    let servers = vec![
        Server::start(topo.pod("server"), PORT).expect("server app"),
        Server::start(topo.pod("outside"), PORT).expect("outside app"),
    ];
    let yaml = format!(
        "{}---\n{}---\n{}",
        workloads_yaml(&[topo.pod("client"), topo.pod("server")]),
        service_yaml("web", VIP, VIP_PORT, PORT, "server"),
        mesh_config_yaml(transport, mesh_spec),
    );
    let name = format!("{}-{test}-{transport}", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 1).expect("mesh-node n2");
    Mesh {
        topo,
        cp,
        n1,
        n2,
        _servers: servers,
    }
}

fn get(m: &Mesh, url: &str) -> serde_json::Value {
    app::run(m.topo.pod("client"), &["get", url], T)
}

fn pod_to_pod_across_nodes_goes_through_the_tunnel_intact_and_encrypted(transport: &str) {
    let m = mesh("wire", transport, "");
    let expected =
        app::run(m.topo.pod("client"), &["blob-sha256", &BLOB.to_string()], T)["sha256"].clone();
    let server = m.topo.pod("server");
    let outside = m.topo.pod("outside");
    let node2_netns = Path::new("/run/netns").join(&m.topo.node("n2").netns);
    let pcap = std::env::temp_dir().join(format!("{}-link.pcap", m.topo.prefix));
    let capture = Tcpdump::start(&node2_netns, mesh_tests::topology::UPLINK, &pcap)
        .expect("tcpdump on n2's uplink");

    // By pod IP (IPv4 and IPv6) and by service VIP: the whole blob arrives.
    for url in [
        format!("http://{}:{PORT}/blob/{BLOB}", server.ipv4),
        format!("http://{VIP}:{VIP_PORT}/blob/{BLOB}"),
        format!("http://[{}]:{PORT}/blob/100000", server.ipv6),
    ] {
        let out = get(&m, &url);
        assert_eq!(out["status"], 200, "{url}: {out}");
        if url.contains(&BLOB.to_string()) {
            assert_eq!(out["len"], BLOB as u64, "{url}: {out}");
            assert_eq!(out["sha256"], expected, "{url}: {out}");
        }
    }
    // The VIP stays what the application sees as its peer.
    let out = get(&m, &format!("http://{VIP}:{VIP_PORT}/blob/10"));
    assert_eq!(out["peer"][0], VIP, "{out}");
    // Control: a pod outside the mesh is reached unchanged, in plaintext.
    let out = get(&m, &format!("http://{}:{PORT}/blob/100000", outside.ipv4));
    assert_eq!(out["status"], 200, "{out}");
    let pcap = capture.finish().expect("tcpdump stopped");

    assert!(m.n1.stat("tunnels_out") >= 4, "n1 log:\n{}", m.n1.log());
    assert!(m.n2.stat("tunnels_in") >= 4, "n2 log:\n{}", m.n2.log());
    // The source's hop (application → proxy) and the destination's (proxy → application).
    m.n1.assert_local_hop();
    m.n2.assert_local_hop();
    // Connections to the same pod address after the first reuse its idle session, or its
    // QUIC connection.
    let reused = m.n1.stat("tunnels_reused");
    assert!(
        reused >= 1,
        "no session was reused; n1 log:\n{}",
        m.n1.log()
    );
    let handshakes = m.n1.stat("tunnels_out") - reused;
    assert!(m.n1.stat("proxy_passthrough") >= 1);
    let accepted = m.n2.log();
    assert!(
        accepted.contains(&format!("client={CLIENT_ID}"))
            && accepted.contains(&format!("transport=\"{transport}\""))
            && accepted.contains("tunnel accepted"),
        "the server side must log the verified client identity:\n{accepted}"
    );
    let quic = transport == "quic";
    let streams = m.n1.stat("tunnels_quic");
    if quic {
        assert_eq!(
            streams,
            m.n1.stat("tunnels_out"),
            "every tunnel is a QUIC stream"
        );
        assert_eq!(handshakes, m.n1.stat("quic_connections_out"));
        assert_eq!(m.n2.stat("quic_connections_in"), handshakes);
    } else {
        assert_eq!(streams, 0, "no QUIC stream on the TLS transport");
    }

    // Every tunnel handshake on the link is TLS 1.3 (QUIC's Initial packets, which carry the
    // ServerHello, are readable without keys).
    let hellos = wire::tshark(
        &pcap,
        &[
            "-Y",
            "tls.handshake.type == 2",
            "-T",
            "fields",
            "-e",
            "tls.handshake.extensions.supported_version",
        ],
    )
    .expect("tshark");
    let versions: Vec<&str> = hellos.lines().collect();
    assert_eq!(
        versions.len() as u64,
        handshakes,
        "server hellos: {hellos:?}"
    );
    assert!(handshakes >= 2, "IPv4 and IPv6 need a session each");
    assert!(
        versions.iter().all(|v| *v == "0x0304"),
        "not all TLS 1.3: {versions:?}"
    );
    // Nothing of the other transport on the tunnel port.
    let unused = if quic { "tcp" } else { "udp" };
    let other = wire::tshark(&pcap, &["-Y", &format!("{unused}.port == 15008")]).expect("tshark");
    assert!(
        other.trim().is_empty(),
        "{unused} on the tunnel port:\n{other}"
    );
    // No plaintext from the payload in the tunnels; the same markers are plainly visible in
    // the control connection, which shows the search would find them.
    let pattern: Vec<u8> = (0..64u32).map(|i| ((i * 37 + 11) % 256) as u8).collect();
    let markers: [&[u8]; 3] = [&pattern, b"GET /blob/", b"HTTP/1.0 200"];
    let tunnel = if quic {
        wire::udp_payloads(&pcap, "udp.port == 15008")
    } else {
        wire::payloads(&pcap, "tcp.port == 15008")
    }
    .expect("tunnel payloads");
    let control = wire::payloads(
        &pcap,
        &format!("ip.addr == {} && tcp.port == {PORT}", outside.ipv4),
    )
    .expect("control payloads");
    let tunnel_bytes: usize = tunnel.iter().map(Vec::len).sum();
    // The kernel may drop some of a fast capture; most of it must be there for the search to
    // mean anything.
    assert!(
        tunnel_bytes > BLOB,
        "only {tunnel_bytes} tunnel bytes captured"
    );
    for marker in markers {
        let shown = String::from_utf8_lossy(marker);
        assert!(
            !wire::contains(&tunnel, marker),
            "plaintext {shown:?} inside the tunnel"
        );
        assert!(wire::contains(&control, marker), "control lacks {shown:?}");
    }
    let direct = wire::tshark(
        &pcap,
        &[
            "-Y",
            &format!("ip.addr == {} && tcp.port == {PORT}", server.ipv4),
        ],
    )
    .expect("tshark");
    assert!(
        direct.trim().is_empty(),
        "plaintext to the server crossed the link:\n{direct}"
    );
    let _ = std::fs::remove_file(pcap.with_extension("log"));
    let _ = std::fs::remove_file(&pcap);
}

fn half_close_and_resets_cross_the_tunnel(transport: &str) {
    let m = mesh("relay", transport, "");
    let client = m.topo.pod("client");
    let server = m.topo.pod("server").ipv4.to_string();
    // The client stops sending; the server still answers everything, then closes.
    let out = app::run(
        client,
        &["halfclose", &server, &PORT.to_string(), "300000"],
        T,
    );
    assert_eq!(out["received"], 300000, "{out}");
    assert_eq!(out["same"], true, "{out}");
    // The application resets the connection: the client sees a reset, not an end of stream.
    let out = app::run(client, &["probe", &server, &PORT.to_string(), "kill"], T);
    assert_eq!(out["outcome"], "reset", "{out}");
    // Nothing listens on the port: the client's connection is reset.
    let out = app::run(client, &["probe", &server, "9999"], T);
    assert_eq!(out["outcome"], "reset", "{out}");
    assert!(m.n1.stat("tunnels_out") >= 2);
    assert!(m.n2.stat("proxy_upstream_failed") >= 1);
}

/// Regression (issue 19): a server that speaks first and closes at once (SMTP's greeting, an
/// error page) has its answer, its bytes and its end of stream reach the source node in one
/// read. That read was taken for a closed session: the client got a reset instead of the
/// bytes, and on a reused session the source retried, so the server saw the connection twice.
fn a_server_that_answers_and_closes_at_once_loses_nothing(transport: &str) {
    const GREETER: u16 = 2525;
    const CONNECTIONS: u64 = 20;
    let m = mesh("greet", transport, "");
    let log = std::env::temp_dir().join(format!("{}-greeter-accepts", m.topo.prefix));
    std::fs::write(&log, "").expect("accept log");
    let greeter = Server::start_greeter(m.topo.pod("server"), GREETER, &log).expect("greeter");
    let server = m.topo.pod("server").ipv4.to_string();
    let out = app::run(
        m.topo.pod("client"),
        &[
            "read",
            &server,
            &GREETER.to_string(),
            &CONNECTIONS.to_string(),
        ],
        T,
    );
    drop(greeter);
    let accepted = std::fs::read_to_string(&log).expect("accept log");
    let _ = std::fs::remove_file(&log);
    assert_eq!(
        out["complete"],
        CONNECTIONS,
        "{out}\nn1 log:\n{}",
        m.n1.log()
    );
    assert_eq!(
        accepted.lines().count() as u64,
        CONNECTIONS,
        "the server saw each connection once: {accepted}"
    );
    // Some went over a reused session or QUIC connection.
    assert!(m.n1.stat("tunnels_reused") >= 1, "{}", m.n1.log());
}

fn the_destination_refuses_tunnel_clients_it_cannot_verify_and_says_why(transport: &str) {
    let mut m = mesh("refuse", transport, "");
    let ca = TestCa::load(&m.cp.data_dir).expect("mesh CA");
    let client = m.topo.pod("client");
    let server = m.topo.pod("server");
    let netns = client.netns_path();
    let dst = std::net::SocketAddr::new(server.ipv4.into(), 15008);
    let request = |source: std::net::IpAddr| TunnelRequest {
        destination_address: mesh_api::ip_to_bytes(server.ipv4.into()),
        destination_port: u32::from(PORT),
        source_address: mesh_api::ip_to_bytes(source),
        source_port: 40000,
        connection_id: 42,
    };
    let from_client = request(client.ipv4.into());
    // One hand-made tunnel on the transport under test: the answer, the server's
    // certificate, and on an OK answer whether a ping crossed it.
    let attempt = |cert: Option<&mesh_tests::tunnel::Issued>, req: &TunnelRequest| {
        if transport == "quic" {
            let out = dial_quic(&netns, dst, cert, req).expect("dial");
            (out.response, out.server_cert, out.pong)
        } else {
            use std::io::{Read as _, Write as _};
            let out = dial(&netns, dst, cert, req).expect("dial");
            let pong = out.stream.is_some_and(|mut stream| {
                let mut pong = [0u8; 5];
                stream.write_all(b"ping\n").is_ok()
                    && stream.read_exact(&mut pong).is_ok()
                    && &pong == b"pong\n"
            });
            (out.response, out.server_cert, pong)
        }
    };

    // Control: a correct certificate gets through, and the server presents its own SVID.
    let good = ca.issue_valid(CLIENT_ID);
    let (response, server_cert, pong) = attempt(Some(&good), &from_client);
    let response = response.expect("answer");
    assert_eq!(response.status(), Status::Ok, "{response:?}");
    let (id, serial) = describe(&server_cert.expect("server cert"));
    assert_eq!(id, SERVER_ID);
    assert_eq!(
        Some(&serial),
        m.n2.cert_serials().expect("/debug/certs").get(SERVER_ID)
    );
    assert!(pong, "no pong through the accepted tunnel");

    let other_source = format!("names {} as its source", server.ipv4);
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let cases: Vec<(
        &str,
        Option<mesh_tests::tunnel::Issued>,
        TunnelRequest,
        &str,
    )> = vec![
        (
            "another identity",
            Some(ca.issue_valid("spiffe://cluster.local/ns/default/sa/intruder")),
            from_client.clone(),
            "not to spiffe://cluster.local/ns/default/sa/intruder",
        ),
        (
            "another trust domain",
            Some(ca.issue_valid("spiffe://evil.example/ns/default/sa/client")),
            from_client.clone(),
            "peer is in trust domain evil.example, expected cluster.local",
        ),
        (
            "a CA the mesh does not trust",
            Some(TestCa::foreign().issue_valid(CLIENT_ID)),
            from_client.clone(),
            "UnknownIssuer",
        ),
        (
            "an expired certificate",
            Some(ca.issue(CLIENT_ID, now - 2 * hour, now - hour)),
            from_client.clone(),
            "expired",
        ),
        (
            "no certificate",
            None,
            from_client.clone(),
            "no certificates",
        ),
        (
            "a header naming another source",
            Some(ca.issue_valid(CLIENT_ID)),
            request(server.ipv4.into()),
            &other_source,
        ),
    ];
    for (what, cert, req, reason) in cases {
        let (response, _, _) = attempt(cert.as_ref(), &req);
        if let Ok(r) = &response {
            assert_ne!(r.status(), Status::Ok, "{what}: accepted");
        }
        let log =
            m.n2.wait_log(Duration::from_secs(10), reason)
                .unwrap_or_else(|e| panic!("{what}: no refusal logged with {reason:?}: {e}"));
        assert!(
            log.lines()
                .any(|l| l.contains("tunnel refused") && l.contains(reason)),
            "{what}: the refusal line must carry the reason {reason:?}"
        );
    }
    assert!(m.n2.stat("tunnels_in_refused") >= 6);
}

fn certificates_rotate_under_a_long_lived_connection(transport: &str) {
    let mut m = mesh("rotate", transport, "certTtl: 20s");
    let server = m.topo.pod("server");
    let before_client = m.n1.cert_serials().expect("/debug/certs")[CLIENT_ID].clone();
    let before_server = m.n2.cert_serials().expect("/debug/certs")[SERVER_ID].clone();
    let linger = app::start(
        m.topo.pod("client"),
        &["linger", &server.ipv4.to_string(), &PORT.to_string(), "30"],
    )
    .expect("linger");

    // Both ends renew at half-life (10 s) while the connection is open.
    let rotated = |node: &MeshNode, id: &str, before: &str| {
        node.cert_serials()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .filter(|s| s != before)
    };
    let mut new_client = None;
    let mut new_server = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while (new_client.is_none() || new_server.is_none()) && std::time::Instant::now() < deadline {
        new_client = new_client.or_else(|| rotated(&m.n1, CLIENT_ID, &before_client));
        new_server = new_server.or_else(|| rotated(&m.n2, SERVER_ID, &before_server));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (Some(_), Some(_)) = (&new_client, &new_server) else {
        panic!(
            "no rotation within 25 s\nn1:\n{}\nn2:\n{}",
            m.n1.log(),
            m.n2.log()
        );
    };

    // A new tunnel presents the current certificates on both ends.
    let out = get(&m, &format!("http://{}:{PORT}/blob/1000", server.ipv4));
    assert_eq!(out["status"], 200, "{out}");
    let current_client = m.n1.cert_serials().expect("/debug/certs")[CLIENT_ID].clone();
    m.n2.wait_log(
        Duration::from_secs(5),
        &format!("client_serial={current_client}"),
    )
    .expect("the new tunnel used the renewed client certificate");
    let ca = TestCa::load(&m.cp.data_dir).expect("mesh CA");
    let probe = dial(
        &m.topo.pod("client").netns_path(),
        std::net::SocketAddr::new(server.ipv4.into(), 15008),
        Some(&ca.issue_valid(CLIENT_ID)),
        &TunnelRequest {
            destination_address: mesh_api::ip_to_bytes(server.ipv4.into()),
            destination_port: u32::from(PORT),
            source_address: mesh_api::ip_to_bytes(m.topo.pod("client").ipv4.into()),
            source_port: 40001,
            connection_id: 1,
        },
    )
    .expect("probe");
    let (_, serial) = describe(&probe.server_cert.expect("server cert"));
    assert_ne!(
        serial, before_server,
        "the server still presents its first certificate"
    );
    assert_eq!(
        Some(&serial),
        m.n2.cert_serials().expect("/debug/certs").get(SERVER_ID)
    );

    // The connection opened before the rotation lived through it.
    let out = app::finish(linger, T);
    assert_eq!(out["error"], serde_json::Value::Null, "{out}");
    assert_eq!(out["failed"], 0, "{out}");
    assert!(out["rounds"].as_u64() >= Some(40), "{out}");
    assert!(m.n1.log().contains("certificate obtained"));
}

fn tunnels_keep_working_while_the_control_plane_is_away(transport: &str) {
    let mut m = mesh("outage", transport, "");
    let server = m.topo.pod("server").ipv4.to_string();
    let linger = app::start(
        m.topo.pod("client"),
        &["linger", &server, &PORT.to_string(), "34"],
    )
    .expect("linger");
    m.cp.pause().expect("stop mesh-cp");
    for node in [&mut m.n1, &mut m.n2] {
        node.wait_for(T, |s| s["cp_connected"] == 0)
            .expect("the node notices the outage");
    }
    // 30 s without a control plane: new tunnels between known workloads, by pod IP and VIP.
    let away = std::time::Instant::now();
    while away.elapsed() < Duration::from_secs(30) {
        for url in [
            format!("http://{server}:{PORT}/blob/1000"),
            format!("http://{VIP}:{VIP_PORT}/blob/1000"),
        ] {
            let out = get(&m, &url);
            assert_eq!(out["status"], 200, "{url} during the outage: {out}");
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    m.cp.resume().expect("restart mesh-cp");
    for node in [&mut m.n1, &mut m.n2] {
        node.wait_for(T, |s| s["cp_connected"] == 1)
            .expect("the node reconnects");
    }
    // The connection opened before the outage lived through it.
    let out = app::finish(linger, T);
    assert_eq!(out["error"], serde_json::Value::Null, "{out}");
    assert_eq!(out["failed"], 0, "{out}");
    assert!(m.n1.stat("tunnels_out") >= 11);
}
