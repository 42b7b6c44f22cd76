//! Traffic management at L4 on two nodes: connect retries around a dead endpoint, outlier
//! ejection and its end, the connect timeout against a black hole, a weighted ServiceRoute and
//! its change, per-node connection limits and destination rate limits, and LeastConnections
//! against a slow endpoint. The servers are `app.py ident` (each answers its name, then holds
//! the connection as long as it was told); the clients are `app.py tally`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, workload_yaml},
    prom::{assert_panels_answer, Exposition},
    topology::Pod,
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const HELD_PORT: u16 = 9090;
const VIP: &str = "10.96.0.20";
const V2_VIP: &str = "10.96.0.21";
const T: Duration = Duration::from_secs(120);
const SERVICE: &str = "default/pay";

struct Mesh {
    cp: ControlPlane,
    n1: MeshNode,
    n2: MeshNode,
    servers: Vec<(String, Server)>,
    /// Last: the daemons stop before the topology's teardown.
    topo: Topology,
}

/// A Service `name` on `vip` with ports 80 → PORT and 90 → HELD_PORT, for `app`.
fn service(name: &str, vip: &str, app: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec: {{ vips: ['{vip}'], ports: [{{ port: 80, targetPort: {PORT} }}, {{ port: 90, targetPort: {HELD_PORT} }}], selector: {{ app: {app} }} }}\n"
    )
}

fn traffic_policy(name: &str, spec: &str) -> String {
    format!("apiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: {name}, namespace: default }}\nspec: {spec}\n")
}

fn route(v1: u32, v2: u32) -> String {
    format!("apiVersion: mycel.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {{ name: canary, namespace: default }}\nspec: {{ service: pay, backends: [{{ service: pay, weight: {v1} }}, {{ service: pay-v2, weight: {v2} }}] }}\n")
}

/// n1 runs `client` and `s1`; n2 runs `s2` and `s3`. `s1`..`s3` are `app: pay` unless
/// `v2` names one to be `app: pay-v2`; Services `pay` (VIP) and `pay-v2` (V2_VIP); each
/// server answers on PORT at once and holds connections on HELD_PORT for `held`.
fn mesh(test: &str, v2: Option<&str>, held: &str, extra: &str) -> Mesh {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client", "s1"]),
        NodeSpec::new("n2", &["s2", "s3"]),
    ])
    .expect("topology");
    let mut docs = vec![workload_yaml(topo.pod("client"), "client")];
    let mut servers = Vec::new();
    for name in ["s1", "s2", "s3"] {
        let app = if v2 == Some(name) { "pay-v2" } else { "pay" };
        docs.push(workload_yaml(topo.pod(name), app));
        servers.push((name.to_owned(), ident(topo.pod(name), PORT, "0")));
        servers.push((
            format!("{name}-held"),
            ident(topo.pod(name), HELD_PORT, held),
        ));
    }
    docs.push(service("pay", VIP, "pay"));
    docs.push(service("pay-v2", V2_VIP, "pay-v2"));
    docs.push(mesh_config_yaml("tls", ""));
    let mut files = vec![("mesh.yaml".to_owned(), docs.join("---\n"))];
    if !extra.is_empty() {
        files.push(("traffic.yaml".to_owned(), extra.to_owned()));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let name = format!("{}-{test}", topo.prefix);
    let cp = ControlPlane::start(&name, &files).expect("mesh-cp");
    let n1 = MeshNode::join_with(&mut topo, "n1", &cp, 2, &["--access-log", "all"])
        .expect("mesh-node n1");
    let n2 = MeshNode::join_with(&mut topo, "n2", &cp, 2, &["--access-log", "all"])
        .expect("mesh-node n2");
    Mesh {
        cp,
        n1,
        n2,
        servers,
        topo,
    }
}

fn ident(pod: &Pod, port: u16, hold: &str) -> Server {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(app::script())
        .args(["ident", &port.to_string(), &pod.name, hold]);
    Server::spawn(pod, &mut cmd).expect("ident server")
}

/// `app.py tally` from the client: `n` connections to `addr`, `concurrency` at a time.
fn tally(m: &Mesh, addr: &str, n: usize, concurrency: usize, slow: f64) -> serde_json::Value {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let n = n.to_string();
    let c = concurrency.to_string();
    let slow = slow.to_string();
    app::run(
        m.topo.pod("client"),
        &["tally", host, port, &n, &c, "30", &slow],
        T,
    )
}

fn count(out: &serde_json::Value, name: &str) -> u64 {
    out["counts"][name].as_u64().unwrap_or(0)
}

fn metrics(node: &MeshNode) -> Exposition {
    Exposition::parse(&node.metrics_text().expect("metrics")).expect("exposition")
}

fn kill(m: &mut Mesh, name: &str) {
    m.servers.retain(|(n, _)| n != name);
}

#[test]
fn a_dead_endpoint_is_retried_around_ejected_and_readmitted() {
    let policy = traffic_policy(
        "pay",
        "{ services: [pay], connect: { timeout: 2s, maxAttempts: 3 }, outlierDetection: { consecutiveFailures: 3, interval: 10s, baseEjectionTime: 8s, maxEjectionTime: 16s } }",
    );
    let mut m = mesh("outlier", None, "0", &policy);
    let vip = format!("{VIP}:80");
    // Steady new connections; s2's application dies once they are under way.
    let client = app::start(
        m.topo.pod("client"),
        &["tally", VIP, "80", "6000", "4", "30", "1.5"],
    )
    .expect("tally");
    let started = Instant::now();
    while metrics(&m.n1).sum(
        "mycel_tcp_connections_opened_total",
        &[("reporter", "source")],
    ) < 300.0
    {
        assert!(started.elapsed() < T, "no load:\n{}", m.n1.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(&mut m, "s2");
    let killed_at = Instant::now();
    let out = app::finish(client, T);
    // Every connect s2 refused was retried elsewhere. What a dead application cannot give
    // back is a connection it had already taken (accepted, or in its accept queue, when it
    // was killed): each such failure is one that s2's node delivered (established, not
    // refused) and that ended with nothing from s2, which its access log shows.
    let lost =
        m.n2.access_log()
            .expect("n2 access log")
            .iter()
            .filter(|l| {
                l["reporter"] == "destination"
                    && l["destination_pod"] == "default/s2"
                    && l["verdict"] == "allowed"
                    && l["bytes_received"] == 0
            })
            .count();
    let failures = out["failures"].as_u64().unwrap_or(u64::MAX);
    assert!(
        failures <= lost as u64 && failures <= 4,
        "{failures} failures, {lost} connections s2 had taken and dropped: {out}"
    );
    for name in ["s1", "s2", "s3"] {
        assert!(count(&out, name) > 0, "{name} answered before: {out}");
    }
    let e = metrics(&m.n1);
    let ejections = e.sum("mycel_service_ejections_total", &[("service", SERVICE)]);
    assert!(ejections >= 1.0, "s2 was ejected:\n{}", m.n1.log());
    eprintln!(
        "dead endpoint under load: {out}; {ejections} ejections; {} connections s2 had taken",
        lost
    );
    let failed_s2 = e.sum(
        "mycel_connect_attempts_total",
        &[("destination_workload", "pay"), ("result", "failed")],
    );
    // Each ejection takes three failures in a row; the four clients may have had one more
    // attempt each on the way when it came.
    assert!(
        failed_s2 >= 3.0 && failed_s2 <= ejections * (3.0 + 4.0),
        "{failed_s2} failed attempts for {ejections} ejections"
    );
    assert!(
        e.sum(
            "mycel_connect_retries_total",
            &[("destination_service", SERVICE)]
        ) >= 3.0
    );
    let ejected_log = m.n1.log();
    assert!(
        ejected_log.contains("endpoint ejected after consecutive connect failures"),
        "{ejected_log}"
    );

    // s2 answers again, but it is still ejected (8 s from the first streak, 16 s if the load
    // outlived that): it gets nothing until its time is up.
    let ejected =
        |m: &Mesh| metrics(&m.n1).sum("mycel_service_endpoints_ejected", &[("service", SERVICE)]);
    assert_eq!(ejected(&m), 1.0, "s2 is out when the load ends");
    m.servers
        .push(("s2".into(), ident(m.topo.pod("s2"), PORT, "0")));
    let out = tally(&m, &vip, 60, 2, 10.0);
    assert_eq!(out["failures"], 0, "{out}");
    if ejected(&m) == 1.0 {
        assert_eq!(
            count(&out, "s2"),
            0,
            "an ejected endpoint got connections: {out}"
        );
    }
    // Back after its ejection time (at most maxEjectionTime, 16 s, after the last failure).
    let deadline = killed_at + Duration::from_secs(60);
    loop {
        let out = tally(&m, &vip, 30, 2, 10.0);
        assert_eq!(out["failures"], 0, "{out}");
        if count(&out, "s2") > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "s2 never came back:\n{}",
            m.n1.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        metrics(&m.n1).sum("mycel_service_endpoints_ejected", &[("service", SERVICE)]),
        0.0
    );
    panels(
        &m,
        &[
            "Traffic: connect attempts and retries per second by service",
            "Traffic: endpoints ejected (outlier detection) and ejections",
        ],
    );
}

/// The dashboard's panels `titles` show this test's traffic.
fn panels(m: &Mesh, titles: &[&str]) {
    assert_panels_answer(&m.topo.prefix, &[m.n1.metrics, m.n2.metrics], titles);
}

#[test]
fn a_black_holed_endpoint_times_out_on_time_and_the_connection_goes_elsewhere() {
    let policy = traffic_policy(
        "pay",
        "{ services: [pay], connect: { timeout: 2s, maxAttempts: 2 }, outlierDetection: { consecutiveFailures: 0 } }",
    );
    let m = mesh("blackhole", None, "0", &policy);
    // s3 answers nothing to the client: a blackhole route in its netns drops its SYN-ACKs,
    // so the client's SYNs to it go unanswered.
    let client = format!("{}/32", m.topo.pod("client").ipv4);
    let s3 = m.topo.pod("s3").netns.clone();
    mesh_tests::topology::ip(&["-n", &s3, "route", "add", "blackhole", &client])
        .expect("blackhole route");
    let out = tally(&m, &format!("{VIP}:80"), 12, 1, 1.0);
    assert_eq!(out["failures"], 0, "{out}");
    assert_eq!(count(&out, "s3"), 0, "{out}");
    // Round-robin gives s3 every third connection first: each waits out the timeout, then
    // succeeds on the next endpoint.
    let slow: Vec<f64> = out["slow"]
        .as_array()
        .expect("slow")
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    assert!(slow.len() >= 3, "{out}");
    eprintln!("black hole, 2 s connect timeout: connections that met it took {slow:?} s");
    for s in &slow {
        assert!(
            (2.0..=2.2).contains(s),
            "the timeout is 2 s, ±10 %: {s} in {out}"
        );
    }
    let e = metrics(&m.n1);
    assert_eq!(
        e.sum(
            "mycel_connect_attempts_total",
            &[("destination_service", SERVICE), ("result", "failed")]
        ),
        slow.len() as f64
    );
    let log = m.n1.log();
    assert!(
        log.contains("no answer from") && log.contains("within the connect timeout"),
        "{log}"
    );
}

#[test]
fn a_route_splits_new_connections_by_weight_and_a_change_leaves_open_ones_alone() {
    let mut m = mesh("route", Some("s3"), "20", &route(90, 10));
    let vip = format!("{VIP}:80");
    let out = tally(&m, &vip, 10_000, 8, 10.0);
    assert_eq!(out["failures"], 0, "{out}");
    let v2 = count(&out, "s3") as f64;
    let share = 100.0 * v2 / 10_000.0;
    eprintln!("route 90/10 over 10,000 new connections: pay-v2 took {share:.2} %");
    assert!(
        (8.0..=12.0).contains(&share),
        "pay-v2 took {share:.2} % (want 10 ± 2): {out}"
    );
    let e = metrics(&m.n1);
    let decided = |backend: &str| {
        e.sum(
            "mycel_route_decisions_total",
            &[("route", "default/canary"), ("backend", backend)],
        )
    };
    assert_eq!(decided("default/pay-v2"), v2);
    assert_eq!(decided("default/pay") + v2, 10_000.0);
    let entry =
        m.n1.access_log()
            .expect("access log")
            .into_iter()
            .find(|l| l["reporter"] == "source" && l["backend"] == "default/pay-v2")
            .expect("an access-log line for a connection the route sent to pay-v2");
    assert_eq!(entry["attempts"], 1, "{entry}");
    let explained =
        m.cp.explain("default/client", SERVICE, 80, false)
            .expect("explain");
    assert_eq!(
        explained["traffic"]["route"], "default/canary",
        "{explained}"
    );

    // Connections held open (20 s each) while the route moves everything to pay-v2.
    let held = app::start(
        m.topo.pod("client"),
        &["tally", VIP, "90", "20", "20", "30", "10"],
    )
    .expect("held tally");
    let open = || {
        metrics(&m.n1).sum(
            "mycel_tcp_connections_open",
            &[
                ("reporter", "source"),
                ("destination_port", &HELD_PORT.to_string()),
            ],
        )
    };
    let started = Instant::now();
    while open() < 20.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "20 held connections open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_v1 = || {
        metrics(&m.n1).sum(
            "mycel_tcp_connections_open",
            &[
                ("reporter", "source"),
                ("destination_workload", "pay"),
                ("destination_port", &HELD_PORT.to_string()),
            ],
        )
    };
    let before = open_v1();
    assert!(before >= 1.0, "some held connections are on pay");
    let pushed = Instant::now();
    m.cp.apply("traffic.yaml", &route(0, 100), &["n1"])
        .expect("route moved");
    let out = tally(&m, &vip, 200, 4, 10.0);
    assert_eq!(
        (count(&out, "s3"), out["failures"].as_u64()),
        (200, Some(0)),
        "{out}"
    );
    assert!(
        pushed.elapsed() < Duration::from_secs(15),
        "still within the held connections' life"
    );
    assert_eq!(open_v1(), before, "open connections stay where they are");
    let held = app::finish(held, T);
    assert_eq!(
        (
            held["failures"].as_u64(),
            held["counts"]
                .as_object()
                .map(|c| c.values().filter_map(|v| v.as_u64()).sum::<u64>())
        ),
        (Some(0), Some(20)),
        "{held}"
    );

    // A bad route is refused naming its field; the last good one stays in force.
    let bad = route(0, 0);
    let error = m.cp.apply_invalid("traffic.yaml", &bad).expect("rejected");
    assert!(
        error.contains("spec.backends: every weight is 0"),
        "{error}"
    );
    let out = tally(&m, &vip, 20, 2, 10.0);
    assert_eq!(count(&out, "s3"), 20, "{out}");
    panels(
        &m,
        &["Traffic: new connections per second by route backend"],
    );
}

#[test]
fn limits_refuse_the_connection_over_them_with_their_reason_and_spare_the_rest() {
    let policies = [
        traffic_policy(
            "pay-limits",
            "{ services: [pay], ports: [90], connectionLimits: { maxConnections: 2 } }",
        ),
        traffic_policy(
            "pay-v2-rate",
            "{ services: [pay-v2], rateLimit: { connections: 5, interval: 1m }, outlierDetection: { consecutiveFailures: 1 } }",
        ),
    ]
    .join("---\n");
    let m = mesh("limits", Some("s3"), "4", &policies);
    // Three held connections at once to pay:90: the third is over maxConnections.
    let out = tally(&m, &format!("{VIP}:90"), 3, 3, 10.0);
    assert_eq!(out["failures"], 1, "{out}");
    // Meanwhile port 80 of the same Service has no limit, and is not affected.
    let out = tally(&m, &format!("{VIP}:80"), 20, 4, 10.0);
    assert_eq!(out["failures"], 0, "{out}");
    let e1 = metrics(&m.n1);
    let failed = |e: &Exposition, reporter: &str, reason: &str| {
        e.sum(
            "mycel_tcp_connections_failed_total",
            &[("reporter", reporter), ("reason", reason)],
        )
    };
    assert_eq!(failed(&e1, "source", "connection_limit"), 1.0);
    let log = m.n1.access_log().expect("access log");
    let refused = log
        .iter()
        .find(|l| l["close_reason"] == "connection_limit")
        .expect("the refusal is in the access log");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap_or("")
            .contains("maxConnections"),
        "{refused}"
    );

    // pay-v2 (s3, on n2) takes five new connections a minute; the rest are refused there.
    let out = tally(&m, &format!("{V2_VIP}:80"), 8, 1, 10.0);
    assert_eq!(
        (count(&out, "s3"), out["failures"].as_u64()),
        (5, Some(3)),
        "{out}"
    );
    assert_eq!(failed(&metrics(&m.n2), "destination", "rate_limited"), 3.0);
    assert_eq!(failed(&metrics(&m.n1), "source", "rate_limited"), 3.0);
    let log = m.n2.access_log().expect("access log");
    assert!(
        log.iter().any(|l| l["close_reason"] == "rate_limited"
            && l["detail"]
                .as_str()
                .unwrap_or("")
                .contains("default/pay-v2-rate")),
        "{log:?}"
    );
    // A rate limit is not retried elsewhere, nor does it make s3 an outlier (one connect
    // failure would).
    assert_eq!(
        metrics(&m.n1).sum("mycel_service_ejections_total", &[]),
        0.0
    );
    // Other workloads on the same node are not limited.
    let out = tally(
        &m,
        &format!("{}:{PORT}", m.topo.pod("s2").ipv4),
        10,
        2,
        10.0,
    );
    assert_eq!(out["failures"], 0, "{out}");
    panels(
        &m,
        &["Traffic: connections refused by a limit or a rate limit"],
    );
}

#[test]
fn least_connections_sends_fewer_connections_to_a_slow_endpoint_than_round_robin() {
    // Two endpoints of pay: s1 (n1) holds each connection 0.05 s, s2 (n2) ten times longer.
    // s3 is pay-v2, out of the way.
    let mut m = mesh("least", Some("s3"), "0", "");
    kill(&mut m, "s1-held");
    kill(&mut m, "s2-held");
    m.servers
        .push(("s1-held".into(), ident(m.topo.pod("s1"), HELD_PORT, "0.05")));
    m.servers
        .push(("s2-held".into(), ident(m.topo.pod("s2"), HELD_PORT, "0.5")));
    let held = format!("{VIP}:90");
    let slow_share = |out: &serde_json::Value| {
        assert_eq!(out["failures"], 0, "{out}");
        100.0 * count(out, "s2") as f64 / (count(out, "s1") + count(out, "s2")) as f64
    };
    let rr = slow_share(&tally(&m, &held, 200, 8, 10.0));
    m.cp.apply(
        "traffic.yaml",
        &traffic_policy("pay", "{ services: [pay], loadBalancer: LeastConnections }"),
        &["n1"],
    )
    .expect("LeastConnections");
    let lc = slow_share(&tally(&m, &held, 200, 8, 10.0));
    // Round-robin splits evenly; least connections keeps the slow one near its share of the
    // open connections: by a margin of at least 20 points.
    assert!(
        (40.0..=60.0).contains(&rr),
        "round-robin gave the slow endpoint {rr:.1} %"
    );
    assert!(
        lc <= rr - 20.0,
        "least connections gave the slow endpoint {lc:.1} %, round-robin {rr:.1} %"
    );
    eprintln!("slow endpoint's share: round-robin {rr:.1} %, least connections {lc:.1} %");
}
