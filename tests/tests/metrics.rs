//! Node metrics and access logs end to end: known traffic through a two-node mesh, then each
//! node's `/metrics` read back: connections and bytes per workload pair from both reporters, a
//! deny attributed to its policy, the eBPF counters, certificates and config freshness; every
//! exposition passes `promtool check metrics` with no family listed twice. n2 logs every
//! connection (`--access-log all`), n1 only denies (the default): each line carries every
//! field.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_api::v1::tunnel_response::Status;
use mesh_tests::{
    app::{self, Server},
    mesh::{http_get, mesh_config_yaml, workloads_yaml},
    prom::{
        dashboard_queries, dashboard_query, promtool_check, value_of, Exposition, PrometheusServer,
        CP_JOB, NODE_JOB,
    },
    tunnel::dial_as,
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(30);
const TD: &str = "spiffe://cluster.local/ns/default/sa";

mesh_tests::on_both_transports!(metrics_count_known_traffic_by_workload_pair);

/// `/readyz` answers from the daemon's start and says ready only once the eBPF programs are
/// attached and the enrolled workload has its certificate: with the control plane down, the
/// node attaches and waits; once it is back, the node is ready and `/debug/*` show the config,
/// the certificate and its chain.
#[test]
fn readyz_waits_for_the_programs_and_the_certificates() {
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["order"])]).expect("topology");
    let pods = [topo.pod("order")];
    let mut cp = ControlPlane::start(
        &format!("{}-readyz", topo.prefix),
        &[
            ("workloads.yaml", &workloads_yaml(&pods)),
            ("mesh.yaml", &mesh_config_yaml("tls", "")),
        ],
    )
    .expect("mesh-cp");
    cp.pause().expect("stop mesh-cp");
    let cg = topo
        .add_cgroup_below(&topo.node("n1").cgroup.clone(), "mesh-node")
        .expect("daemon cgroup");
    let node = MeshNode::connect(topo.node("n1"), &cp, Some(&cg), &[]).expect("mesh-node");

    // Every answer until the node has attached and is waiting for the control plane.
    let deadline = Instant::now() + T;
    let mut answers = Vec::new();
    loop {
        if let Ok(answer) = node.admin_get("/readyz") {
            let waiting = answer.1.contains("no config from the control plane yet");
            answers.push(answer);
            if waiting {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{answers:?}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Loading the programs (BTF and all) takes the daemon a while (about 150 ms here), and the
    // endpoint answers from before: the first state seen is "not attached".
    assert!(
        answers[0].1.contains("eBPF programs are not attached"),
        "{answers:?}"
    );
    for (code, body) in &answers {
        assert_eq!(
            *code, 503,
            "ready before the control plane answered: {body}"
        );
        assert!(
            body.contains("eBPF programs are not attached")
                || body.contains("no config from the control plane"),
            "{body}"
        );
    }
    // The programs are attached (the counters read), and still not ready without certificates.
    assert!(node.stats().is_ok(), "{}", node.log());
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = node.admin_get("/readyz").expect("/readyz");
    assert_eq!(code, 503, "{body}");

    cp.resume().expect("restart mesh-cp");
    let ready = Instant::now() + T;
    while node.admin_get("/readyz").map(|(c, _)| c).ok() != Some(200) {
        assert!(Instant::now() < ready, "never ready:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, body) = node.admin_get("/readyz").expect("/readyz");
    assert_eq!(body, "ready\n");

    let json = |path: &str| -> serde_json::Value {
        let (code, body) = node.admin_get(path).expect(path);
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    };
    let config = json("/debug/config");
    assert!(
        config["version"].as_u64().is_some_and(|v| v > 0),
        "{config}"
    );
    assert_eq!(config["mode"], "control-plane");
    let order = &config["workloads"][0];
    assert_eq!(order["key"], "default/order", "{config}");
    assert_eq!(order["on_this_node"], true, "{config}");
    assert_eq!(order["identity"], format!("{TD}/order"));
    let certs = json("/debug/certs");
    let cert = &certs["certificates"][0];
    assert_eq!(cert["identity"], format!("{TD}/order"), "{certs}");
    assert!(
        cert["chain"].as_array().is_some_and(|c| !c.is_empty()),
        "{certs}"
    );
    assert_eq!(
        certs["trust_roots"].as_array().map(Vec::len),
        Some(1),
        "{certs}"
    );
    let connections = json("/debug/connections");
    assert_eq!(connections["inbound"], serde_json::json!([]));
    drop(node);
    drop(cp);
    drop(topo);
}

struct Mesh {
    cp: ControlPlane,
    n1: MeshNode,
    n2: MeshNode,
    _servers: Vec<Server>,
    /// Last: the daemons stop before the topology's teardown.
    topo: Topology,
}

fn mesh(transport: &str) -> Mesh {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["order", "analytics"]),
        NodeSpec::new("n2", &["payment"]),
    ])
    .expect("topology");
    let servers = ["payment", "analytics"]
        .iter()
        .map(|p| Server::start(topo.pod(p), PORT).expect("server"))
        .collect();
    let pods = ["order", "analytics", "payment"].map(|p| topo.pod(p));
    let cp = ControlPlane::start(
        &format!("{}-metrics-{transport}", topo.prefix),
        &[
            ("workloads.yaml", &workloads_yaml(&pods)),
            ("mesh.yaml", &mesh_config_yaml(transport, "")),
        ],
    )
    .expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node n1");
    let n2 = MeshNode::join_with(
        &mut topo,
        "n2",
        &cp,
        1,
        &["--access-log", "all", "--metrics-pod-labels"],
    )
    .expect("mesh-node n2");
    Mesh {
        cp,
        n1,
        n2,
        _servers: servers,
        topo,
    }
}

impl Mesh {
    /// `n` ping/pong connections (5 bytes each way) from `from` to `to`.
    fn pings(&self, from: &str, to: &str, n: usize) {
        let ip = self.topo.pod(to).ipv4.to_string();
        let out = app::run(
            self.topo.pod(from),
            &["loop", &ip, &PORT.to_string(), &n.to_string()],
            T,
        );
        assert_eq!(out["failures"], 0, "{from} -> {to}: {out}");
    }
}

/// Scrapes `node` until `done` holds for the exposition (connections close asynchronously).
fn scrape_until(node: &MeshNode, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + T;
    loop {
        let text = node.metrics_text().expect("GET /metrics");
        let e = Exposition::parse(&text).expect("a well-formed exposition");
        if done(&e) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {T:?}\n{text}\nlog:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pair<'a>(reporter: &'a str, src: &'a str, dst: &'a str) -> [(&'a str, &'a str); 6] {
    [
        ("reporter", reporter),
        ("source_workload", src),
        ("source_namespace", "default"),
        ("destination_workload", dst),
        ("destination_namespace", "default"),
        ("destination_port", "8080"),
    ]
}

fn metrics_count_known_traffic_by_workload_pair(transport: &str) {
    let mut m = mesh(transport);
    // A real Prometheus scrapes both nodes from before the traffic (rates need two samples).
    let mut prom = PrometheusServer::start(
        &format!("{}-{transport}", m.topo.prefix),
        &[
            (NODE_JOB, m.n1.metrics),
            (NODE_JOB, m.n2.metrics),
            (CP_JOB, m.cp.metrics),
        ],
    )
    .expect("prometheus");
    // Versions start where the clock is (they never go back across restarts): what is
    // checked is that the policy made exactly one.
    let before = m.cp.version().expect("the version in force");
    let applied = m.cp.apply(
        "block-analytics.yaml",
        &format!(
            "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{ name: block-analytics, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ app: payment }} }}\n  action: Deny\n  rules: [{{ sourceIdentities: ['{TD}/analytics'] }}]\n"
        ),
        &["n1", "n2"],
    )
    .expect("policy applied");
    assert_eq!(applied, before + 1, "one version for one policy");

    // Across nodes: 7 pings, then one half-closed echo of 100,000 bytes (5 + 100,000 sent,
    // 100,000 back).
    m.pings("order", "payment", 7);
    let ip = m.topo.pod("payment").ipv4.to_string();
    let echo = app::run(
        m.topo.pod("order"),
        &["halfclose", &ip, &PORT.to_string(), "100000"],
        T,
    );
    assert_eq!(echo["same"], true, "{echo}");
    // On one node: 3 pings, reported by n1 as source and as destination.
    m.pings("order", "analytics", 3);
    m.n1.assert_local_hop();
    m.n2.assert_local_hop();

    let (sent, received) = (7.0 * 5.0 + 100_005.0, 7.0 * 5.0 + 100_000.0);
    for (node, reporter) in [(&m.n1, "source"), (&m.n2, "destination")] {
        let want = pair(reporter, "order", "payment");
        let e = scrape_until(node, reporter, |e| {
            e.sum("mycel_tcp_connections_closed_total", &want) >= 8.0
        });
        let v = |name: &str| e.sum(name, &want);
        assert_eq!(v("mycel_tcp_connections_opened_total"), 8.0, "{reporter}");
        assert_eq!(v("mycel_tcp_connections_closed_total"), 8.0, "{reporter}");
        assert_eq!(v("mycel_tcp_connections_open"), 0.0, "{reporter}");
        assert_eq!(v("mycel_tcp_connections_failed_total"), 0.0, "{reporter}");
        assert_eq!(v("mycel_tcp_sent_bytes_total"), sent, "{reporter}");
        assert_eq!(v("mycel_tcp_received_bytes_total"), received, "{reporter}");
        assert_eq!(
            v("mycel_tcp_connection_duration_seconds_count"),
            8.0,
            "{reporter}"
        );
        let identities: Vec<_> = e
            .matching("mycel_tcp_connections_opened_total", &want)
            .map(|(l, _)| {
                (
                    l["source_identity"].clone(),
                    l["destination_identity"].clone(),
                )
            })
            .collect();
        assert_eq!(
            identities,
            [(format!("{TD}/order"), format!("{TD}/payment"))],
            "{reporter}"
        );
        // Pods are labels only where asked for (n2).
        let pods: Vec<_> = e
            .matching("mycel_tcp_connections_opened_total", &want)
            .map(|(l, _)| {
                (
                    l.get("source_pod").cloned(),
                    l.get("destination_pod").cloned(),
                )
            })
            .collect();
        let expected = match reporter {
            "destination" => (Some("order".to_owned()), Some("payment".to_owned())),
            _ => (None, None),
        };
        assert_eq!(pods, [expected], "{reporter}");
    }
    let e = scrape_until(&m.n1, "same node", |e| {
        e.sum(
            "mycel_tcp_connections_closed_total",
            &pair("destination", "order", "analytics"),
        ) >= 3.0
    });
    for reporter in ["source", "destination"] {
        let want = pair(reporter, "order", "analytics");
        assert_eq!(e.sum("mycel_tcp_connections_opened_total", &want), 3.0);
        assert_eq!(e.sum("mycel_tcp_sent_bytes_total", &want), 15.0);
        assert_eq!(e.sum("mycel_tcp_received_bytes_total", &want), 15.0);
    }
    let tunnel_connects = e.sum(
        "mycel_tcp_connect_duration_seconds_count",
        &[("transport", transport)],
    );
    assert_eq!(
        tunnel_connects, 8.0,
        "connect latency observed per tunnelled connection"
    );

    // analytics is refused in its own node's kernel; a client that skips that check (a raw
    // tunnel with analytics' certificate) is denied by n2, attributed to the policy.
    let probe = app::run(m.topo.pod("analytics"), &["probe", &ip, "8080"], T);
    assert_eq!(probe["outcome"], "eperm", "{probe}");
    let (analytics, payment) = (m.topo.pod("analytics"), m.topo.pod("payment"));
    let out = dial_as(
        &m.cp.data_dir,
        analytics,
        payment,
        PORT,
        &format!("{TD}/analytics"),
    )
    .expect("dial");
    assert_eq!(out.response.expect("an answer").status(), Status::Denied);
    let denied = [
        pair("destination", "analytics", "payment").as_slice(),
        &[("reason", "denied")],
    ]
    .concat();
    let e2 = scrape_until(&m.n2, "the deny", |e| {
        e.sum("mycel_tcp_connections_failed_total", &denied) >= 1.0
    });
    assert_eq!(e2.sum("mycel_tcp_connections_failed_total", &denied), 1.0);
    let decision = [
        ("policy", "default/block-analytics"),
        ("rule", "0"),
        ("action", "Deny"),
        ("mode", "Enforce"),
    ];
    assert_eq!(e2.sum("mycel_policy_decisions_total", &decision), 1.0);
    let e1 = Exposition::parse(&m.n1.metrics_text().expect("n1 metrics")).expect("parse");
    assert_eq!(
        e1.sum("mycel_ebpf_events_total", &[("event", "fast_denied")]),
        1.0
    );
    assert!(e1.sum("mycel_ebpf_events_total", &[("event", "redirected")]) >= 11.0);

    // Certificates and config freshness.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for (e, workload) in [(&e1, "order"), (&e1, "analytics"), (&e2, "payment")] {
        let id = format!("{TD}/{workload}");
        let expiry = e.sum(
            "mycel_certificate_expiry_timestamp_seconds",
            &[("identity", &id)],
        );
        assert!(expiry > now + 3600.0, "{id} expires at {expiry}, now {now}");
    }
    // Every local workload's certificate was issued at least once, and none failed.
    for (e, local) in [(&e1, 2.0), (&e2, 1.0)] {
        let issued = e.sum("mycel_certificate_requests_total", &[("result", "issued")]);
        assert!(issued >= local, "certificates issued: {issued}");
        assert_eq!(
            e.sum("mycel_certificate_requests_total", &[("result", "error")]),
            0.0
        );
    }
    for e in [&e1, &e2] {
        let age = e.sum("mycel_config_age_seconds", &[]);
        assert!((0.0..600.0).contains(&age), "config age {age}");
        assert_eq!(e.sum("mycel_control_plane_connected", &[]), 1.0);
        assert!(e.sum("process_resident_memory_bytes", &[]) > 0.0);
        let roots: Vec<f64> = e
            .matching("mycel_trust_root_expiry_timestamp_seconds", &[])
            .map(|(_, v)| v)
            .collect();
        assert!(
            roots.len() == 1 && roots[0] > now + 86_400.0,
            "trust roots: {roots:?}"
        );
        assert!(e.sum("mycel_runtime_workers", &[]) >= 1.0);
        assert!(e.sum("mycel_runtime_alive_tasks", &[]) >= 1.0);
    }

    // The access log: n2 logged each connection it delivered, and the deny, with every field.
    let lines = m.n2.access_log().expect("n2 access log");
    let delivered: Vec<_> = lines
        .iter()
        .filter(|l| l["source_workload"] == "default/order")
        .collect();
    assert_eq!(delivered.len(), 8, "{lines:#?}");
    let echo_line = delivered
        .iter()
        .find(|l| l["bytes_sent"] == 100_005)
        .unwrap_or_else(|| panic!("no line for the echo: {delivered:#?}"));
    let order = m.topo.pod("order").ipv4.to_string();
    let payment_addr = format!("{ip}:{PORT}");
    for (field, want) in [
        ("reporter", "destination"),
        ("source_identity", &format!("{TD}/order")),
        ("destination_workload", "default/payment"),
        ("source_pod", "default/order"),
        ("destination_pod", "default/payment"),
        ("destination_identity", &format!("{TD}/payment")),
        ("destination_address", &payment_addr),
        ("transport", transport),
        ("verdict", "allowed"),
        ("policy", "default"),
        ("rule", "-"),
        ("close_reason", "closed"),
    ] {
        assert_eq!(echo_line[field], want, "{field} in {echo_line}");
    }
    assert_eq!(echo_line["bytes_received"], 100_000, "{echo_line}");
    assert_eq!(echo_line["destination_port"], PORT, "{echo_line}");
    let source = echo_line["source_address"].as_str().unwrap_or_default();
    assert!(source.starts_with(&format!("{order}:")), "{echo_line}");
    assert!(echo_line["duration_seconds"]
        .as_f64()
        .is_some_and(|d| d > 0.0));
    assert!(echo_line["connection_id"].as_u64().is_some_and(|id| id > 0));
    assert!(
        echo_line["time"]
            .as_str()
            .is_some_and(|t| t.len() >= 20 && t.ends_with('Z')),
        "{echo_line}"
    );
    let deny = lines
        .iter()
        .find(|l| l["verdict"] == "denied")
        .unwrap_or_else(|| panic!("no deny logged: {lines:#?}"));
    for (field, want) in [
        ("reporter", "destination"),
        ("source_workload", "default/analytics"),
        ("source_pod", "default/analytics"),
        ("source_identity", &format!("{TD}/analytics")),
        ("destination_workload", "default/payment"),
        ("transport", "tls"),
        ("policy", "default/block-analytics"),
        ("rule", "0"),
        ("close_reason", "denied"),
    ] {
        assert_eq!(deny[field], want, "{field} in {deny}");
    }
    assert_eq!(deny["connection_id"], 7, "{deny}");
    assert_eq!(deny["bytes_sent"], 0, "{deny}");
    let analytics_addr = format!("{}:40000", m.topo.pod("analytics").ipv4);
    assert_eq!(deny["source_address"], analytics_addr.as_str(), "{deny}");
    // n1 logs denies only: it decided none (analytics was refused in its kernel).
    assert_eq!(
        m.n1.access_log().expect("n1 access log"),
        Vec::<serde_json::Value>::new()
    );

    // Prometheus, with the dashboard's own queries: counts exact, bytes within 0.1 %, the deny
    // under its policy, every node up; and every query of the dashboard is valid PromQL that
    // returns data.
    let opened = dashboard_query("Connections opened by service pair (total)", 0);
    let result = prom
        .wait_for(&opened, |r| {
            value_of(
                r,
                &[
                    ("source_workload", "order"),
                    ("destination_workload", "payment"),
                ],
            ) == Some(8.0)
                && value_of(r, &[("destination_workload", "analytics")]) == Some(3.0)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", prom.log()));
    assert_eq!(result.len(), 2, "{result:?}");
    let order_payment = [
        ("source_workload", "order"),
        ("destination_workload", "payment"),
    ];
    for (panel, target, want) in [
        (
            "Bytes by service pair (total, source → destination and back)",
            0,
            sent,
        ),
        (
            "Bytes by service pair (total, source → destination and back)",
            1,
            received,
        ),
    ] {
        let r = prom
            .query(&dashboard_query(panel, target))
            .expect("bytes query");
        let got = value_of(&r, &order_payment).unwrap_or(f64::NAN);
        assert!(
            (got - want).abs() <= want * 0.001,
            "{panel}: {got} vs {want}: {r:?}"
        );
    }
    let denies = prom
        .wait_for(
            &dashboard_query("Denies by policy and rule (total)", 0),
            |r| !r.is_empty(),
        )
        .expect("denies");
    assert_eq!(
        value_of(
            &denies,
            &[("policy", "default/block-analytics"), ("rule", "0")]
        ),
        Some(1.0),
        "{denies:?}"
    );
    assert_eq!(denies.len(), 1, "{denies:?}");
    let up = prom
        .query(&format!("up{{job=\"{NODE_JOB}\"}}"))
        .expect("up");
    assert_eq!(up.iter().map(|(_, v)| v).sum::<f64>(), 2.0, "{up:?}");
    // Rates need two scrapes of a series: wait for data rather than query once.
    // The traffic-management and HTTP panels need their own traffic (retries, ejections,
    // limits, routes; requests): tests/tests/traffic.rs and http.rs check them.
    let queries = dashboard_queries();
    let own_traffic = |t: &str| t.starts_with("Traffic: ") || t.starts_with("HTTP: ");
    for (title, expr) in queries.iter().filter(|(t, _)| !own_traffic(t)) {
        prom.wait_for(expr, |r| !r.is_empty())
            .unwrap_or_else(|e| panic!("{title}: {e}"));
    }

    // The control plane: nodes, certificates, pushes acknowledged, its CA, its endpoints.
    let cp_text = http_get(m.cp.metrics, "/metrics").expect("mesh-cp /metrics");
    let cp = Exposition::parse(&cp_text).expect("mesh-cp exposition");
    assert_eq!(cp.sum("mycel_cp_nodes_connected", &[]), 2.0, "{cp_text}");
    assert_eq!(
        cp.sum("mycel_cp_certificates_issued_total", &[]),
        3.0,
        "{cp_text}"
    );
    assert_eq!(cp.sum("mycel_cp_config_errors_total", &[]), 0.0);
    assert_eq!(
        cp.sum("mycel_cp_config_version", &[]),
        applied as f64,
        "the version in force"
    );
    assert_eq!(cp.sum("mycel_cp_config_dir_in_force", &[]), 1.0);
    // A snapshot per node, then the policy to both: each acknowledged, with its latency.
    let pushes = cp.sum("mycel_cp_config_pushes_total", &[]);
    assert!(pushes >= 4.0, "{cp_text}");
    assert_eq!(
        cp.sum("mycel_cp_config_acks_total", &[("result", "ok")]),
        pushes,
        "{cp_text}"
    );
    assert_eq!(
        cp.sum("mycel_cp_config_push_duration_seconds_count", &[]),
        pushes
    );
    assert!(cp.sum("mycel_cp_ca_expiry_timestamp_seconds", &[]) > now + 86_400.0);
    // On the status port, and on the metrics port for the kubelet's probes.
    for addr in [m.cp.http, m.cp.metrics] {
        assert_eq!(
            http_get(addr, "/readyz").expect("mesh-cp /readyz"),
            "ready\n"
        );
        assert_eq!(
            http_get(addr, "/healthz").expect("mesh-cp /healthz"),
            "ok\n"
        );
    }
    let nodes: serde_json::Value =
        serde_json::from_str(&http_get(m.cp.http, "/debug/nodes").expect("/debug/nodes"))
            .expect("JSON");
    for node in ["n1", "n2"] {
        assert_eq!(nodes["nodes"][node]["streams"], 1, "{nodes}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&http_get(m.cp.http, "/debug/config").expect("/debug/config"))
            .expect("JSON");
    assert_eq!(config["version"], applied, "{config}");
    assert!(
        config["policies"]["default/block-analytics"].is_object(),
        "{config}"
    );
    assert_eq!(
        config["workloads"]["default/payment"]["node"], "n2",
        "{config}"
    );

    // Every exposition passes promtool and lists each family once.
    for text in [
        m.n1.metrics_text().expect("n1 metrics"),
        m.n2.metrics_text().expect("n2 metrics"),
        cp_text,
    ] {
        if let Err(problems) = promtool_check(&text).expect("promtool") {
            panic!("promtool check metrics:\n{problems}\n{text}");
        }
        let e = Exposition::parse(&text).expect("parse");
        let mut families = e.families.clone();
        families.sort();
        let before = families.len();
        families.dedup();
        assert_eq!(families.len(), before, "a family is listed twice:\n{text}");
    }

    tunnels_open_and_streams_carried(&mut m, transport);
}

/// The tunnels of the traffic above: n1 has its tunnels to payment open (idle, kept for the
/// next connection). Once n1 stops, n2 has none open, and the tunnels it saw closed carried
/// every connection: the 8 from order and the denied one.
fn tunnels_open_and_streams_carried(m: &mut Mesh, transport: &str) {
    let e1 = Exposition::parse(&m.n1.metrics_text().expect("n1 metrics")).expect("parse");
    let out = [("direction", "out"), ("transport", transport)];
    let open = e1.sum("mycel_tunnels_open", &out);
    assert!((1.0..=8.0).contains(&open), "{open} tunnels open out of n1");
    let e2 = Exposition::parse(&m.n2.metrics_text().expect("n2 metrics")).expect("parse");
    assert!(e2.sum("mycel_tunnels_open", &[("direction", "in")]) >= 1.0);

    m.n1.stop_with(libc::SIGTERM).expect("stop n1");
    let e2 = scrape_until(&m.n2, "n1's tunnels closed", |e| {
        e.sum("mycel_tunnels_open", &[("direction", "in")]) == 0.0
    });
    let carried = e2.sum("mycel_tunnel_streams_sum", &[("direction", "in")]);
    assert_eq!(carried, 9.0, "connections carried by n2's inbound tunnels");
    let tunnels = e2.sum("mycel_tunnel_streams_count", &[("direction", "in")]);
    assert!((2.0..=9.0).contains(&tunnels), "{tunnels} inbound tunnels");
    // The denied dial was a tunnel of its own, with one connection.
    let one = [("direction", "in"), ("transport", "tls"), ("le", "1")];
    assert!(e2.sum("mycel_tunnel_streams_bucket", &one) >= 1.0);
}

/// The shipped scrape config for plain hosts is valid Prometheus configuration.
#[test]
fn the_shipped_scrape_config_passes_promtool() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/prometheus-scrape.yml"
    );
    let out = std::process::Command::new("promtool")
        .args(["check", "config", path])
        .output()
        .expect("promtool (apt-get install prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
