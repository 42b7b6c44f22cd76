//! Service ports that declare HTTP (`appProtocol`), on two nodes: requests over one kept-alive
//! connection are split by a ServiceRoute and balanced over endpoints one by one (HTTP/1.1 and
//! HTTP/2 with prior knowledge), where the same port without `appProtocol` sends every request
//! of a connection to one endpoint; the mesh answers 503 itself, saying so, when a Service has
//! no endpoint; an upgraded connection (`Upgrade:`) carries bytes both ways; a client that
//! does not speak HTTP to an HTTP port is closed and counted. The servers and clients are
//! `mesh-http`.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, sibling_bin, workload_yaml},
    prom::{
        assert_panels_answer, dashboard_query, value_of, Exposition, PrometheusServer, NODE_JOB,
    },
    topology::Pod,
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.30";
const V2_VIP: &str = "10.96.0.31";
const EMPTY_VIP: &str = "10.96.0.32";
const T: Duration = Duration::from_secs(120);
/// Denies the `client` workload's identity everything to `pay`.
const DENY_CLIENT: &str = "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: { name: no-client, namespace: default }\nspec: { selector: { matchLabels: { app: pay } }, action: Deny, rules: [{ sourceIdentities: ['spiffe://cluster.local/ns/default/sa/client'] }] }\n";

fn http_bin() -> Command {
    Command::new(sibling_bin("mesh-http", "MESH_HTTP_BIN"))
}

/// `mesh-http serve` in `pod`, answering with the pod's name.
fn serve(pod: &Pod) -> Server {
    Server::spawn(
        pod,
        http_bin().args(["serve", "--port", &PORT.to_string(), "--name", &pod.name]),
    )
    .expect("mesh-http server")
}

/// `mesh-http ARGS` started in `pod`, its JSON line to come (`app::finish_json`).
fn start(topo: &Topology, pod: &str, args: &[&str]) -> std::process::Child {
    topo.pod(pod)
        .spawn(
            http_bin()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("mesh-http client")
}

/// `mesh-http ARGS` in the client pod; its JSON line.
fn client(topo: &Topology, args: &[&str]) -> serde_json::Value {
    let child = start(topo, "client", args);
    app::finish_json(child, T, &format!("mesh-http {args:?}"))
}

/// The reason of the one kind of answer the mesh gave itself in a client's run (empty if
/// none).
fn mesh_error(out: &serde_json::Value) -> String {
    out["by_mesh_error"]
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .unwrap_or_default()
}

/// Ports 80 (http), 81 (h2c) and 82 (bytes) to PORT, for `app`.
fn service(name: &str, vip: &str, app: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec: {{ vips: ['{vip}'], ports: [{{ port: 80, targetPort: {PORT}, appProtocol: http }}, {{ port: 81, targetPort: {PORT}, appProtocol: h2c }}, {{ port: 82, targetPort: {PORT} }}], selector: {{ app: {app} }} }}\n"
    )
}

fn count(out: &serde_json::Value, body: &str) -> u64 {
    out["by_body"][body].as_u64().unwrap_or(0)
}

#[test]
fn over_tls_requests_are_split_and_balanced_one_by_one_and_the_mesh_answers_for_itself() {
    split_balance_and_answer("tls");
}

#[test]
fn over_quic_requests_are_split_and_balanced_one_by_one_and_the_mesh_answers_for_itself() {
    split_balance_and_answer("quic");
}

/// The test, with tunnels of `transport` (`tls` or `quic`).
fn split_balance_and_answer(transport: &str) {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client", "p1"]),
        NodeSpec::new("n2", &["p2", "v2"]),
    ])
    .expect("topology");
    let docs = [
        workload_yaml(topo.pod("client"), "client"),
        workload_yaml(topo.pod("p1"), "pay"),
        workload_yaml(topo.pod("p2"), "pay"),
        workload_yaml(topo.pod("v2"), "pay-v2"),
        service("pay", VIP, "pay"),
        service("pay-v2", V2_VIP, "pay-v2"),
        service("empty", EMPTY_VIP, "nobody"),
        "apiVersion: mycel.dev/v1alpha1\nkind: ServiceRoute\nmetadata: { name: canary, namespace: default }\nspec: { service: pay, backends: [{ service: pay, weight: 90 }, { service: pay-v2, weight: 10 }] }\n".to_owned(),
        mesh_config_yaml(transport, ""),
    ];
    let yaml = docs.join("---\n");
    let _servers: Vec<Server> = ["p1", "p2", "v2"]
        .into_iter()
        .map(|p| serve(topo.pod(p)))
        .collect();
    let name = format!("{}-http-{transport}", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 2).expect("mesh-node n2");

    // One connection each, thousands of requests: the route's 90/10 holds per request, and
    // pay's two endpoints (one on each node) share its part.
    const N: u64 = 5000;
    let n = N.to_string();
    let by_h1 = format!("{VIP}:80");
    let by_h2 = format!("{VIP}:81");
    let h1 = client(&topo, &["get", "--addr", &by_h1, "--count", &n]);
    let h2 = client(
        &topo,
        &[
            "get",
            "--addr",
            &by_h2,
            "--count",
            &n,
            "--h2",
            "--concurrency",
            "4",
        ],
    );
    // HTTP/2 with prior knowledge on the `http` port: served as HTTP/2 toward the client,
    // HTTP/1.1 toward the endpoints.
    let h2_on_http = client(
        &topo,
        &[
            "get",
            "--addr",
            &by_h1,
            "--count",
            "200",
            "--h2",
            "--concurrency",
            "4",
        ],
    );
    assert_eq!(h2_on_http["by_status"]["200"], 200, "{h2_on_http}");
    assert!(
        count(&h2_on_http, "p1") > 0 && count(&h2_on_http, "p2") > 0,
        "{h2_on_http}"
    );
    // The control: the same Service port without appProtocol, one connection.
    let by_l4 = format!("{VIP}:82");
    let l4 = client(&topo, &["get", "--addr", &by_l4, "--count", "300"]);
    println!("{transport}: HTTP/1.1: {h1}\nh2c: {h2}\nbytes (L4): {l4}");
    for (what, out) in [("HTTP/1.1", &h1), ("h2c", &h2)] {
        assert_eq!(out["requests"], N, "{what}: {out}");
        assert_eq!(out["by_status"]["200"], N, "{what}: {out}");
        let v2 = count(out, "v2") as f64 / N as f64;
        assert!((0.08..=0.12).contains(&v2), "{what}: v2 took {v2}: {out}");
        for p in ["p1", "p2"] {
            let share = count(out, p) as f64 / N as f64;
            assert!(
                (0.35..=0.55).contains(&share),
                "{what}: {p} took {share}: {out}"
            );
        }
    }
    assert_eq!(
        l4["by_body"].as_object().map(|o| o.len()),
        Some(1),
        "one connection relayed as bytes goes to one endpoint: {l4}"
    );
    // The clients are gone: so are the upstream connections they made (and their slots).
    let open = |node: &MeshNode| {
        let e = Exposition::parse(&node.metrics_text().expect("metrics")).expect("exposition");
        e.sum(
            "mycel_tcp_connections_open",
            &[("reporter", "source"), ("source_workload", "client")],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open(&n1) > 0.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(open(&n1), 0.0, "upstream connections outlived their client");
    // They were counted under these labels (so the check above could fail).
    let e = Exposition::parse(&n1.metrics_text().expect("metrics")).expect("exposition");
    let opened = e.sum(
        "mycel_tcp_connections_opened_total",
        &[("reporter", "source"), ("source_workload", "client")],
    );
    assert!(opened >= 3.0, "{opened} upstream connections counted");

    // Only the mesh says it answered: an endpoint's forged header does not reach the client.
    let forged = client(
        &topo,
        &["get", "--addr", &by_h1, "--path", "/forge", "--count", "4"],
    );
    assert_eq!(forged["by_status"]["200"], 4, "{forged}");
    assert_eq!(forged["by_mesh_error"], serde_json::json!({}), "{forged}");

    // More requests at once from one HTTP/2 client than it may have upstream connections
    // (32; HTTP/1.1 toward the endpoints, one request each). Short requests wait for a
    // connection to come free and all are answered; ones longer than that wait (1 s) get the
    // mesh's 503, which is the client's doing, not the endpoints' (none ejected).
    let burst = |delay_ms: u32| {
        let path = format!("/delay/{delay_ms}");
        client(
            &topo,
            &[
                "get",
                "--addr",
                &by_h1,
                "--path",
                &path,
                "--count",
                "60",
                "--h2",
                "--concurrency",
                "60",
            ],
        )
    };
    let waited = burst(200);
    println!("60 at once, 200 ms each: {waited}");
    assert_eq!(waited["by_status"]["200"], 60, "{waited}");
    let many = burst(1500);
    println!("60 at once, 1.5 s each: {many}");
    let refused = many["by_status"]["503"].as_u64().unwrap_or(0);
    assert_eq!(many["by_status"]["200"].as_u64(), Some(32), "{many}");
    assert_eq!(refused, 28, "{many}");
    let capped = many["by_mesh_error"]
        .as_object()
        .is_some_and(|o| o.keys().all(|k| k.contains("upstream connections busy")));
    assert!(capped, "{many}");
    let e = Exposition::parse(&n1.metrics_text().expect("metrics")).expect("exposition");
    assert_eq!(e.sum("mycel_service_ejections_total", &[]), 0.0);

    // No endpoint: the mesh answers, and says it did.
    let empty = format!("{EMPTY_VIP}:80");
    let out = client(&topo, &["get", "--addr", &empty, "--count", "1"]);
    assert_eq!(out["by_status"]["503"], 1, "{out}");
    let why = mesh_error(&out);
    assert!(why.contains("no endpoint of default/empty"), "{out}");

    // An upgraded connection carries bytes both ways.
    let out = client(&topo, &["upgrade", "--addr", &by_h1]);
    assert_eq!(out["status"], 101, "{out}");
    assert_eq!(out["echoed"], "hello through the upgrade\n", "{out}");

    // Not HTTP on an HTTP port: closed, logged and counted.
    let out = app::run(topo.pod("client"), &["loop", VIP, "80", "1"], T);
    assert_eq!(out["failures"], 1, "{out}");
    let exposition = Exposition::parse(&n1.metrics_text().expect("metrics")).expect("exposition");
    let not_http = exposition.sum(
        "mycel_http_not_http_total",
        &[("destination_service", "default/pay"), ("protocol", "http")],
    );
    assert_eq!(not_http, 1.0, "the metric counts it");
    assert!(
        n1.log().contains("is not HTTP to a port declared http"),
        "{}",
        n1.log()
    );
    drop((n1, n2, cp));
}

/// `mesh-http serve` in `pod` that answers 503 to every `fail_every`th request.
fn serve_failing(pod: &Pod, fail_every: u32) -> Server {
    serve_failing_with(pod, fail_every, &[])
}

fn serve_failing_with(pod: &Pod, fail_every: u32, more: &[&str]) -> Server {
    Server::spawn(
        pod,
        http_bin()
            .args([
                "serve",
                "--port",
                &PORT.to_string(),
                "--name",
                &pod.name,
                "--fail-every",
                &fail_every.to_string(),
            ])
            .args(more),
    )
    .expect("mesh-http server")
}

fn traffic_policy(name: &str, service: &str, http: &str) -> String {
    format!("apiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: {name}, namespace: default }}\nspec: {{ services: [{service}], http: {http} }}\n")
}

/// Requests `pod`'s server answered (other than this question), asked in the pod over
/// loopback, which the mesh leaves alone: the answer does not depend on policy.
fn answered(topo: &Topology, pod: &str) -> u64 {
    let addr = format!("127.0.0.1:{PORT}");
    let args = ["get", "--addr", &addr, "--path", "/count", "--count", "1"];
    let child = start(topo, pod, &args);
    let out = app::finish_json(child, T, &format!("mesh-http {args:?} in {pod}"));
    let body = out["by_body"]
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .unwrap_or_default();
    body.parse()
        .unwrap_or_else(|_| panic!("{pod} /count: {out}"))
}

/// Retries on a status: an endpoint that fails one request in three is retried around and the
/// client sees no failure. The retry budget: with every endpoint failing, retries add at most
/// their share of requests, counted by the servers themselves. The request timeout: a stalled
/// endpoint gets the mesh's 504 on time.
#[test]
fn retries_hide_a_flaky_endpoint_the_budget_holds_and_timeouts_answer_504() {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client", "a"]),
        NodeSpec::new("n2", &["b", "c", "d", "e"]),
    ])
    .expect("topology");
    let docs = [
        workload_yaml(topo.pod("client"), "client"),
        workload_yaml(topo.pod("a"), "pay"),
        workload_yaml(topo.pod("b"), "pay"),
        workload_yaml(topo.pod("c"), "pay"),
        workload_yaml(topo.pod("d"), "down"),
        workload_yaml(topo.pod("e"), "down"),
        service("pay", VIP, "pay"),
        service("down", V2_VIP, "down"),
        traffic_policy(
            "pay",
            "pay",
            "{ requestTimeout: 1s, retries: { attempts: 2, retryOnStatus: [503] } }, connect: { backoff: 20ms }",
        ),
        traffic_policy(
            "down",
            "down",
            "{ retries: { attempts: 3, retryOnStatus: [503], budgetPercent: 20, minRetriesPerSecond: 0 } }",
        ),
        mesh_config_yaml("tls", ""),
    ];
    let yaml = docs.join("---\n");
    let _servers = [
        serve_failing(topo.pod("a"), 3),
        serve(topo.pod("b")),
        serve(topo.pod("c")),
        // Their 503s say `Connection: close`, which is about their connection to the mesh,
        // not the client's: the client's keep-alive connection carries every answer.
        serve_failing_with(topo.pod("d"), 1, &["--close-on-fail"]),
        serve_failing_with(topo.pod("e"), 1, &["--close-on-fail"]),
    ];
    let name = format!("{}-retry", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 4).expect("mesh-node n2");

    let by_vip = format!("{VIP}:80");
    let flaky = client(&topo, &["get", "--addr", &by_vip, "--count", "900"]);
    let a = answered(&topo, "a");
    println!("one endpoint failing one request in three, retried on 503: {flaky}; a answered {a}");
    assert_eq!(flaky["by_status"]["200"], 900, "{flaky}");
    assert!(a >= 250, "a took its share and failed a third of it: {a}");
    // A 503 that is tried again leaves its connection usable (hyper reads the rest of a small
    // unread answer): a handful of upstream connections, not one per retry (~100).
    let e = Exposition::parse(&n1.metrics_text().expect("metrics")).expect("exposition");
    let upstreams = e.sum(
        "mycel_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_service", "default/pay"),
        ],
    );
    println!("upstream connections for 900 requests and their retries: {upstreams}");
    assert!(
        (3.0..=12.0).contains(&upstreams),
        "{upstreams} upstream connections"
    );
    // A retried request waited connect.backoff (20 ms) first; the others did not.
    let (p50, p99) = (flaky["p50_us"].as_u64(), flaky["p99_us"].as_u64());
    assert!(
        p50 < Some(20_000) && p99 >= Some(20_000),
        "backoff: p50 {p50:?} µs, p99 {p99:?} µs"
    );

    // A POST may have been processed before its 503: it is not sent again, and the client
    // sees what a's third of failures makes of its share.
    let posts = client(
        &topo,
        &[
            "get", "--addr", &by_vip, "--count", "90", "--method", "POST",
        ],
    );
    println!("90 POSTs, retryOnStatus 503 (not for POST): {posts}");
    let failed = posts["by_status"]["503"].as_u64().unwrap_or(0);
    assert!((3..=20).contains(&failed), "{posts}");

    const N: u64 = 500;
    let down = format!("{V2_VIP}:80");
    let out = client(&topo, &["get", "--addr", &down, "--count", &N.to_string()]);
    let served = answered(&topo, "d") + answered(&topo, "e");
    let exposition = Exposition::parse(&n1.metrics_text().expect("metrics")).expect("exposition");
    let retried = exposition.sum(
        "mycel_http_retries_total",
        &[("destination_service", "default/down")],
    );
    let refused = exposition.sum(
        "mycel_http_retry_budget_exhausted_total",
        &[("destination_service", "default/down")],
    );
    println!(
        "every endpoint failing: {out}; the servers answered {served} for {N} requests; retries {retried}, over budget {refused}"
    );
    assert_eq!(
        out["by_status"]["503"], N,
        "the failures reach the client: {out}"
    );
    assert!(
        served > N && served <= N + N / 5 + 1,
        "retries at most 20 % of the requests: {served} for {N}"
    );
    assert_eq!(served as f64, N as f64 + retried);
    assert!(refused > 0.0);

    let stall = client(
        &topo,
        &["get", "--addr", &by_vip, "--path", "/stall", "--count", "1"],
    );
    println!("a stalled request, requestTimeout 1s: {stall}");
    assert_eq!(stall["by_status"]["504"], 1, "{stall}");
    let took = stall["p50_us"].as_u64().unwrap_or(0);
    assert!(
        (1_000_000..=1_100_000).contains(&took),
        "504 after {took} µs for a 1 s timeout"
    );
    let why = mesh_error(&stall);
    assert!(why.contains("within requestTimeout 1s"), "{stall}");
    drop((n1, n2, cp));
}

/// Request metrics per pair, read as the dashboard reads them from a real Prometheus: two
/// Services a client calls, one answering after 5 ms and failing one request in ten, the
/// other after 50 ms over HTTP/2. Counts are exact; each pair's quantiles lie between its
/// server's delay and what the client itself measured (within a bucket's width); the success
/// rate is 90 % and 100 %. `--access-log requests` logs each request with its figures.
#[test]
fn request_metrics_give_each_pair_its_quantiles_and_success_rate_on_the_dashboard() {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client"]),
        NodeSpec::new("n2", &["fast", "slow"]),
    ])
    .expect("topology");
    let docs = [
        workload_yaml(topo.pod("client"), "client"),
        workload_yaml(topo.pod("fast"), "fast"),
        workload_yaml(topo.pod("slow"), "slow"),
        service("fast", VIP, "fast"),
        service("slow", V2_VIP, "slow"),
        mesh_config_yaml("tls", ""),
    ];
    let yaml = docs.join("---\n");
    let _servers = [serve_failing(topo.pod("fast"), 10), serve(topo.pod("slow"))];
    let name = format!("{}-reqm", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let n1 = MeshNode::join_with(&mut topo, "n1", &cp, 1, &["--access-log", "requests"])
        .expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 2).expect("mesh-node n2");

    let (fast_addr, slow_addr) = (format!("{VIP}:80"), format!("{V2_VIP}:81"));
    let fast = client(
        &topo,
        &[
            "get", "--addr", &fast_addr, "--path", "/delay/5", "--count", "200",
        ],
    );
    let slow = client(
        &topo,
        &[
            "get",
            "--addr",
            &slow_addr,
            "--path",
            "/delay/50",
            "--count",
            "100",
            "--h2",
            "--concurrency",
            "4",
        ],
    );
    println!("5 ms, one in ten failing: {fast}\n50 ms over HTTP/2: {slow}");
    assert_eq!(
        (
            fast["by_status"]["200"].as_u64(),
            fast["by_status"]["503"].as_u64()
        ),
        (Some(180), Some(20)),
        "{fast}"
    );
    assert_eq!(slow["by_status"]["200"], 100, "{slow}");
    // Four at a time over one connection were answered together: one at a time, each would
    // wait for three others (p50 near 4 × 50 ms).
    let slow_p50 = slow["p50_us"].as_u64().unwrap_or(u64::MAX);
    assert!(slow_p50 < 150_000, "requests waited for each other: {slow}");

    let e = Exposition::parse(&n1.metrics_text().expect("metrics")).expect("exposition");
    let requests = |dst: &str, code: &str| {
        e.sum(
            "mycel_http_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_workload", dst),
                ("destination_service", &format!("default/{dst}")),
                ("method", "GET"),
                ("code", code),
            ],
        )
    };
    assert_eq!(
        [
            requests("fast", "2xx"),
            requests("fast", "5xx"),
            requests("slow", "2xx")
        ],
        [180.0, 20.0, 100.0]
    );
    // The h2c client's first four requests at once shared one upstream connection.
    let slow_upstreams = e.sum(
        "mycel_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_workload", "slow"),
        ],
    );
    assert_eq!(slow_upstreams, 1.0, "one HTTP/2 connection to slow");

    // The dashboard's own queries, from Prometheus.
    let mut prom =
        PrometheusServer::start(&topo.prefix, &[(NODE_JOB, n1.metrics)]).expect("prometheus");
    let pair = |dst: &'static str| [("source_workload", "client"), ("destination_workload", dst)];
    let success = dashboard_query("HTTP: success rate by service pair (since start)", 0);
    let rates = prom
        .wait_for(&success, |r| {
            value_of(r, &pair("fast")) == Some(0.9) && value_of(r, &pair("slow")) == Some(1.0)
        })
        .unwrap_or_else(|e| panic!("success rate: {e}\n{}", prom.log()));
    println!("success rate by pair: {rates:?}");
    let latency = "HTTP: request latency p50 / p95 / p99 by service pair (since start)";
    for (dst, delay, out) in [("fast", 0.005, &fast), ("slow", 0.05, &slow)] {
        let quantiles: Vec<f64> = (0..3)
            .map(|i| {
                let r = prom
                    .wait_for(&dashboard_query(latency, i), |r| {
                        value_of(r, &pair(dst)).is_some()
                    })
                    .unwrap_or_else(|e| panic!("{latency} {i}: {e}\n{}", prom.log()));
                value_of(&r, &pair(dst)).unwrap_or_default()
            })
            .collect();
        let client_p50 = out["p50_us"].as_f64().unwrap_or_default() / 1e6;
        let client_p99 = out["p99_us"].as_f64().unwrap_or_default() / 1e6;
        println!(
            "client → {dst}: p50/p95/p99 {quantiles:?} s; the client measured p50 {client_p50} s, p99 {client_p99} s"
        );
        // The proxy's time is inside the client's; interpolation within a bucket may put the
        // quantile anywhere in it, and buckets are at most 1.6 wide.
        let (p50, p95, p99) = (quantiles[0], quantiles[1], quantiles[2]);
        assert!(
            p50 >= delay / 1.6 && p50 <= client_p50 * 1.6,
            "{dst}: p50 {p50}, client {client_p50}"
        );
        assert!(p50 <= p95 && p95 <= p99, "{dst}: {quantiles:?}");
        assert!(
            p99 >= delay / 1.6 && p99 <= client_p99 * 1.6,
            "{dst}: p99 {p99}, client {client_p99}"
        );
    }
    assert_panels_answer(
        &topo.prefix,
        &[n1.metrics],
        &[
            "HTTP: request latency p50 / p95 / p99 by service pair",
            "HTTP: success rate by service pair",
            "HTTP: requests per second by service pair and code",
            "HTTP: time to response headers p50 / p99 by service pair",
        ],
    );

    // The access log: a line per request, with where it went and how long it took.
    let lines = n1.access_log().expect("n1 access log");
    let requests: Vec<_> = lines.iter().filter(|l| l["kind"] == "request").collect();
    assert_eq!(requests.len(), 300, "{lines:#?}");
    let failed = requests.iter().filter(|l| l["status"] == 503).count();
    assert_eq!(failed, 20);
    let line = requests
        .iter()
        .find(|l| l["destination_workload"] == "default/fast" && l["status"] == 200)
        .unwrap_or_else(|| panic!("no line for a fast request: {requests:#?}"));
    let fast_addr = format!("{}:{PORT}", topo.pod("fast").ipv4);
    for (field, want) in [
        ("reporter", "source"),
        ("source_workload", "default/client"),
        ("destination_service", "default/fast"),
        ("destination_address", &fast_addr),
        ("method", "GET"),
        ("path", "/delay/5"),
        ("version", "HTTP/1.1"),
        ("code", "2xx"),
        ("mesh_error", ""),
    ] {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    println!("a request's line: {line}");
    let client_ip = topo.pod("client").ipv4.to_string();
    let source = line["source_address"].as_str().unwrap_or_default();
    assert!(source.starts_with(&format!("{client_ip}:")), "{line}");
    assert_eq!(line["complete"], true, "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    let headers = line["headers_seconds"].as_f64().unwrap_or_default();
    let total = line["duration_seconds"].as_f64().unwrap_or_default();
    assert!(headers >= 0.005 && total >= headers, "{line}");
    assert!(
        requests
            .iter()
            .any(|l| l["version"] == "HTTP/2" && l["destination_workload"] == "default/slow"),
        "{requests:#?}"
    );
    drop((n1, n2, cp));
}

/// A client (n1) and one `pay` endpoint (p1, serving; n2), with `extra` config documents,
/// over TLS tunnels. Dropped in field order: the daemons, the control plane, the server,
/// then the topology.
struct OneEndpoint {
    n1: MeshNode,
    n2: MeshNode,
    cp: ControlPlane,
    _server: Server,
    topo: Topology,
}

fn one_endpoint(tag: &str, extra: &[&str]) -> OneEndpoint {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["client"]),
        NodeSpec::new("n2", &["p1"]),
    ])
    .expect("topology");
    let mut docs = vec![
        workload_yaml(topo.pod("client"), "client"),
        workload_yaml(topo.pod("p1"), "pay"),
        service("pay", VIP, "pay"),
        mesh_config_yaml("tls", ""),
    ];
    docs.extend(extra.iter().map(|d| (*d).to_owned()));
    let yaml = docs.join("---\n");
    let server = serve(topo.pod("p1"));
    let name = format!("{}-{tag}", topo.prefix);
    let cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 1).expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 1).expect("mesh-node n2");
    OneEndpoint {
        n1,
        n2,
        cp,
        _server: server,
        topo,
    }
}

/// A deny reaches what HTTP connections already carry: a kept-alive HTTP/1.1 client and a
/// WebSocket-style upgraded connection, both open when the policy arrives. The upstream
/// connections under them are closed by the destination's node (as any connection a policy
/// change denies), the next request gets the mesh's 503 saying the destination refused, and
/// not one request after the first refusal is answered by the server.
#[test]
fn a_deny_reaches_kept_alive_requests_and_upgraded_connections() {
    let mut m = one_endpoint("deny", &[]);

    let by_vip = format!("{VIP}:80");
    let spawn = |args: &[&str]| start(&m.topo, "client", args);
    // Eight seconds of each, a request or a line every 100 ms.
    let kept = spawn(&[
        "get",
        "--addr",
        &by_vip,
        "--count",
        "80",
        "--interval-ms",
        "100",
    ]);
    let upgraded = spawn(&[
        "upgrade",
        "--addr",
        &by_vip,
        "--lines",
        "80",
        "--interval-ms",
        "100",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    m.cp.apply("deny.yaml", DENY_CLIENT, &["n1", "n2"])
        .expect("the deny applied");
    let answered_at_deny = answered(&m.topo, "p1");
    let kept = app::finish_json(kept, T, "kept-alive client");
    let upgraded = app::finish_json(upgraded, T, "upgraded client");
    let answered_after = answered(&m.topo, "p1");
    println!("kept alive: {kept}\nupgraded: {upgraded}\nthe server answered {answered_at_deny} by the deny and {answered_after} in all");

    let ok = kept["by_status"]["200"].as_u64().unwrap_or(0);
    assert!(ok >= 10, "requests went through before the deny: {kept}");
    assert_eq!(kept["requests"], 80, "{kept}");
    let (last_ok, first_not_ok) = (kept["last_ok"].as_u64(), kept["first_not_ok"].as_u64());
    assert!(
        first_not_ok.is_some() && last_ok < first_not_ok,
        "once refused, never answered again: {kept}"
    );
    // A request on its way when the deny closes the upstream connection under it fails
    // with that connection (502): neither node can tell whether the server had it. Only the
    // first failure may be that one; every request after it is refused (503).
    let cut = kept["by_status"]["502"].as_u64().unwrap_or(0);
    assert!(
        cut == 0 || (cut == 1 && kept["first_not_ok_status"] == 502),
        "at most the request in flight at the deny is cut: {kept}"
    );
    assert_eq!(
        kept["by_status"]["503"].as_u64(),
        Some(80 - ok - cut),
        "{kept}"
    );
    let errors: Vec<&String> = kept["by_mesh_error"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    let refused = errors.iter().filter(|k| k.contains("refused")).count();
    assert_eq!(
        refused, 1,
        "the refusals say the destination refused: {kept}"
    );
    // The destination's policy and rule names stay in the nodes' logs.
    assert!(errors.iter().all(|k| !k.contains("no-client")), "{kept}");
    // The server saw nothing after the deny was in force (at most the request on its way).
    assert!(
        answered_after <= answered_at_deny + 1,
        "{answered_at_deny} then {answered_after}"
    );

    assert_eq!(upgraded["status"], 101, "{upgraded}");
    let lines = upgraded["lines_echoed"].as_u64().unwrap_or(0);
    assert!(
        (10..80).contains(&lines) && upgraded["ended_by"] != "done",
        "the upgraded connection carried lines, then was closed: {upgraded}"
    );
    let e = Exposition::parse(&m.n2.metrics_text().expect("metrics")).expect("exposition");
    let closed = e.sum(
        "mycel_tcp_connections_failed_total",
        &[("reporter", "destination"), ("reason", "closed_by_policy")],
    );
    assert!(
        closed >= 2.0,
        "n2 closed both upstream connections: {closed}"
    );
}

/// A deny on the node where both ends live reaches HTTP/2 streams already on their way: the
/// node closes its upstream connections to the endpoint, with the streams on them. hyper runs
/// an HTTP/2 connection's I/O in a task of its own, which outlived the request side's driver:
/// streams still waiting for their answers (`/delay`), and a stream whose answer's headers
/// came (`/drip`) on a connection already retired from the pool (`maxConnectionDuration`,
/// then another request), all went on to the end.
#[test]
fn a_same_node_deny_cuts_http2_streams_in_flight() {
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["client", "p1"])]).expect("topology");
    let yaml = [
        workload_yaml(topo.pod("client"), "client"),
        workload_yaml(topo.pod("p1"), "pay"),
        service("pay", VIP, "pay"),
        mesh_config_yaml("tls", ""),
        "apiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: short, namespace: default }\nspec: { services: [pay], maxConnectionDuration: 1s }\n".to_owned(),
    ]
    .join("---\n");
    let _server = serve(topo.pod("p1"));
    let name = format!("{}-h2deny", topo.prefix);
    let mut cp = ControlPlane::start(&name, &[("mesh.yaml", &yaml)]).expect("mesh-cp");
    let _n1 = MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node n1");

    let by_vip = format!("{VIP}:81");
    let h2 = |path: &str, interval: &str| {
        let args = [
            "get",
            "--addr",
            &by_vip,
            "--h2",
            "--path",
            path,
            "--count",
            "2",
            "--concurrency",
            "2",
            "--interval-ms",
            interval,
        ];
        start(&topo, "client", &args)
    };
    // Two streams answered after 8 s.
    let waiting = h2("/delay/8000", "0");
    // Two streams whose bodies come 8 s after their headers, the second 2 s after the first:
    // by then the first one's connection is past its 1 s and the second takes a new one.
    let dripping = h2("/drip/8000", "2000");
    std::thread::sleep(Duration::from_millis(3500));
    cp.apply("deny.yaml", DENY_CLIENT, &["n1"])
        .expect("the deny applied");
    let waiting = app::finish_json(waiting, T, "h2c client waiting for answers");
    let dripping = app::finish_json(dripping, T, "h2c client reading bodies");
    println!("waiting: {waiting}\ndripping: {dripping}");
    assert_eq!(waiting["requests"], 2, "{waiting}");
    assert_eq!(
        waiting["by_status"]["200"].as_u64().unwrap_or(0),
        0,
        "an answer came through after the deny: {waiting}"
    );
    assert_eq!(dripping["requests"], 2, "{dripping}");
    assert_eq!(
        count(&dripping, "p1"),
        0,
        "a body came through after the deny: {dripping}"
    );
}

/// An upgraded connection holds its upstream connection, and so its slot of the Service's
/// `connectionLimits`, for as long as it lasts: with `maxConnections: 1` a request while it is
/// open gets the mesh's 503 saying so, and one after it ended is answered.
#[test]
fn an_upgraded_connection_counts_against_the_connection_limit() {
    let m = one_endpoint("limit", &["apiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: one, namespace: default }\nspec: { services: [pay], connectionLimits: { maxConnections: 1 } }\n"]);

    let by_vip = format!("{VIP}:80");
    let upgraded = start(
        &m.topo,
        "client",
        &[
            "upgrade",
            "--addr",
            &by_vip,
            "--lines",
            "30",
            "--interval-ms",
            "100",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let during = client(&m.topo, &["get", "--addr", &by_vip, "--count", "1"]);
    let upgraded = app::finish_json(upgraded, T, "upgraded client");
    let after = client(&m.topo, &["get", "--addr", &by_vip, "--count", "1"]);
    println!("while upgraded: {during}\nupgraded: {upgraded}\nafter: {after}");
    assert_eq!(upgraded["lines_echoed"], 30, "{upgraded}");
    assert_eq!(during["by_status"]["503"], 1, "{during}");
    let why = mesh_error(&during);
    assert!(why.contains("connectionLimits"), "{during}");
    assert_eq!(after["by_status"]["200"], 1, "{after}");
}

/// `maxConnectionDuration` and `idleTimeout` apply to the upstream connections an HTTP port's
/// requests ride on. Past its maximum an upstream connection takes no new request and closes
/// once the one in flight is answered, so a client sending a request every 100 ms over one
/// connection sees every one answered while the upstream connections under it are renewed;
/// one left idle is closed, and counted so, and the next request gets a new one.
#[test]
fn upstream_connections_expire_without_failing_a_request() {
    let m = one_endpoint("expire", &["apiVersion: mycel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: expire, namespace: default }\nspec: { services: [pay], idleTimeout: 1s, maxConnectionDuration: 2s }\n"]);
    let counts = || {
        let e = Exposition::parse(&m.n1.metrics_text().expect("metrics")).expect("exposition");
        let client = [("reporter", "source"), ("source_workload", "client")];
        let failed = |reason: &str| {
            let mut labels = client.to_vec();
            labels.push(("reason", reason));
            e.sum("mycel_tcp_connections_failed_total", &labels)
        };
        (
            e.sum("mycel_tcp_connections_opened_total", &client),
            failed("max_duration"),
            failed("idle_timeout"),
        )
    };

    let by_vip = format!("{VIP}:80");
    let busy = client(
        &m.topo,
        &[
            "get",
            "--addr",
            &by_vip,
            "--count",
            "40",
            "--interval-ms",
            "100",
        ],
    );
    let (opened, max_cut, idle_cut) = counts();
    println!("a request per 100 ms for 4 s, maxConnectionDuration 2s: {busy}; upstream connections {opened}, cut at their maximum {max_cut}, idle {idle_cut}");
    assert_eq!(busy["by_status"]["200"], 40, "{busy}");
    assert!(
        opened >= 2.0,
        "the upstream connection was renewed: {opened}"
    );
    assert_eq!((max_cut, idle_cut), (0.0, 0.0), "none was cut");

    let sparse = client(
        &m.topo,
        &[
            "get",
            "--addr",
            &by_vip,
            "--count",
            "2",
            "--interval-ms",
            "2500",
        ],
    );
    let (after, max_cut, idle_cut) = counts();
    println!("two requests 2.5 s apart, idleTimeout 1s: {sparse}; upstream connections {}, idle {idle_cut}", after - opened);
    assert_eq!(sparse["by_status"]["200"], 2, "{sparse}");
    assert_eq!(
        after - opened,
        2.0,
        "a new connection after the idle one was closed"
    );
    assert_eq!((max_cut, idle_cut), (0.0, 1.0));
}
