//! `cargo xtask up`: a sandbox mesh until Ctrl-C: mesh-cp, two nodes, and the seeds' scenario:
//! order calls payment (pod IP and service VIP, through the tunnel) and inventory; analytics is
//! denied payment by an AccessPolicy, in its own node's kernel; a canary, payment-v2, takes
//! 10 % of the new connections to payment's VIP by a ServiceRoute, and each round prints the
//! split it saw. With Prometheus installed, a server on loopback scrapes both nodes and the
//! control plane. It prints the dashboard's URL, and `mycel status`, `mycel check` and
//! `mycel explain` on the sandbox. With `--ha`, the mesh is kept in etcd (Debian's, on
//! loopback) and two mesh-cp replicas serve it; the nodes name both.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_tests::{
    app::{self, Server},
    etcd::{self, Etcd, SharedCa},
    mesh::{sibling_bin, workloads_yaml},
    prom::{PrometheusServer, CP_JOB, NODE_JOB},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

/// The second replica, the etcd both keep the mesh in, and the key that seals their CA
/// (`up --ha`).
struct Standby {
    replica: ControlPlane,
    etcd: Etcd,
    _key: SharedCa,
}

/// Starts etcd, two replicas on it (the CA kept there, sealed), and applies `files` through
/// the first.
fn start_replicas(prefix: &str, files: &[(&str, &str)]) -> anyhow::Result<(ControlPlane, Standby)> {
    let etcd = Etcd::start(prefix).context("starting etcd")?;
    let key = etcd::sealing_key(prefix).context("making the CA's sealing key")?;
    let start = |name: &str| {
        ControlPlane::start_etcd_sealed(&format!("{prefix}-{name}"), &etcd, &key.sealing_key())
            .with_context(|| format!("starting mesh-cp replica {name}"))
    };
    let a = start("cp1")?;
    let b = start("cp2")?;
    for (name, text) in files {
        a.store_cmd("apply", name, text)
            .with_context(|| format!("mesh-cp apply -f {name}"))?;
    }
    Ok((
        a,
        Standby {
            replica: b,
            etcd,
            _key: key,
        },
    ))
}

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";
const V2_VIP: &str = "10.96.0.11";
/// Where payment and payment-v2 also answer their name (`app.py ident`), for the canary's
/// split; the Services take it on port 90.
const NAME_PORT: u16 = 9090;
/// New connections per round to see the canary's split.
const SPLIT_SAMPLE: u32 = 50;

pub fn run(duration: Option<u64>, ha: bool) -> anyhow::Result<()> {
    crate::prereqs::ensure_all()?;
    crate::build_bins()?;
    // Block SIGINT/SIGTERM here and collect them with sigtimedwait, so that Ctrl-C always ends
    // in the teardown below. Children inherit the mask; the daemons unblock their stop signals
    // at start (the demo app servers are killed, not signalled).
    let signals = block_stop_signals();

    let topo = Topology::with_prefix(
        "mycel-up",
        &[
            NodeSpec::new("node1", &["order", "analytics", "db"]),
            NodeSpec::new("node2", &["payment", "payment-v2", "inventory"]),
        ],
    )
    .map_err(|e| anyhow::anyhow!("creating the sandbox: {e}"))?;
    let (order, analytics, db, payment, payment_v2, inventory) = (
        topo.pod("order"),
        topo.pod("analytics"),
        topo.pod("db"),
        topo.pod("payment"),
        topo.pod("payment-v2"),
        topo.pod("inventory"),
    );
    let mut servers = Vec::new();
    for pod in [payment, payment_v2, inventory] {
        servers.push(
            Server::start(pod, PORT)
                .with_context(|| format!("starting the demo server in pod {}", pod.name))?,
        );
    }
    for pod in [payment, payment_v2] {
        let mut ident = std::process::Command::new("/usr/bin/python3");
        ident
            .arg(app::script())
            .args(["ident", &NAME_PORT.to_string(), &pod.name, "0"]);
        servers.push(
            Server::spawn(pod, &mut ident)
                .with_context(|| format!("starting the name server in pod {}", pod.name))?,
        );
    }
    let config = format!(
        "{}---\n{}---\n{}",
        workloads_yaml(&[order, analytics, payment, payment_v2, inventory]),
        payment_service("payment", VIP),
        payment_service("payment-v2", V2_VIP),
    );
    let files = [
        ("mesh.yaml", config.as_str()),
        ("block-analytics.yaml", BLOCK_ANALYTICS),
        ("payment-canary.yaml", CANARY),
    ];
    let (cp, standby) = if ha {
        let (a, standby) = start_replicas(&topo.prefix, &files)?;
        (a, Some(standby))
    } else {
        let cp = ControlPlane::start(&topo.prefix, &files).context("starting mesh-cp")?;
        (cp, None)
    };
    let addrs: Vec<std::net::SocketAddr> = std::iter::once(cp.grpc)
        .chain(standby.as_ref().map(|s| s.replica.grpc))
        .collect();
    // Where the config lives, and how to change it.
    let (config_at, edit) = match &standby {
        Some(s) => (
            format!("etcd {}", s.etcd.endpoint()),
            format!(
                "mesh-cp apply -f FILE --etcd-endpoints {}  (and mesh-cp delete)",
                s.etcd.endpoint()
            ),
        ),
        None => (
            cp.config_dir.display().to_string(),
            format!(
                "edit or add YAML in {}: mesh-cp applies it; a bad file is reported on /status",
                cp.config_dir.display()
            ),
        ),
    };
    let mut nodes = Vec::new();
    for (name, enrolled) in [("node1", 2), ("node2", 3)] {
        let mut node = MeshNode::connect_to_any(topo.node(name), &cp, &addrs, None, &[])
            .with_context(|| format!("starting mesh-node on {name}"))?;
        node.wait_for(Duration::from_secs(30), |s| {
            s.get("enrolled_workloads") == Some(&enrolled) && s.get("svids") == Some(&enrolled)
        })
        .with_context(|| format!("waiting for mesh-node on {name}"))?;
        nodes.push(node);
    }
    let _servers = servers;
    let (node1, node2) = (&nodes[0], &nodes[1]);
    let prometheus = start_prometheus(&topo.prefix, &cp, node1, node2);

    println!();
    println!("Mycel sandbox is up:");
    println!(
        "  node1: order ({}), analytics ({}), db ({}, not in the mesh)",
        order.ipv4, analytics.ipv4, db.ipv4
    );
    println!(
        "  node2: payment ({}), payment-v2 ({}), inventory ({})",
        payment.ipv4, payment_v2.ipv4, inventory.ipv4
    );
    println!("  service payment: {VIP}:80 -> payment:{PORT}, {VIP}:90 -> payment:{NAME_PORT}");
    println!("  service payment-v2: {V2_VIP}:80 -> payment-v2:{PORT}, {V2_VIP}:90 -> payment-v2:{NAME_PORT}");
    println!(
        "  route default/payment-canary: payment's new connections 90 % to payment, 10 % to payment-v2 (payment-canary.yaml in {config_at})"
    );
    println!(
        "  policy default/block-analytics: Deny analytics -> payment (block-analytics.yaml in {config_at})"
    );
    println!(
        "  mesh-cp: config in {config_at}, data dir {}, log {}",
        cp.data_dir.display(),
        cp.log_file().display()
    );
    if let Some(s) = &standby {
        println!(
            "  mesh-cp replica 2: gRPC {}, status http://{}/status, log {} (the nodes name both: --cp {},{}); etcd log {}",
            s.replica.grpc,
            s.replica.http,
            s.replica.log_file().display(),
            cp.grpc,
            s.replica.grpc,
            s.etcd.log_file().display()
        );
        println!("  stop either replica (kill its pid) and watch the nodes move to the other: `mycel status --cp` on each");
    }
    println!();
    let mycel = sibling_bin("mycel", "MYCEL_BIN");
    let cp_http = cp.http.to_string();
    let with_cp = |args: &[&str]| -> Vec<String> {
        ["--cp", cp_http.as_str()]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect()
    };
    println!(
        "Dashboard (nodes, the service graph, policies, explain): http://{}/ui",
        cp.http
    );
    println!();
    println!(
        "Is the mesh healthy? `mycel` asks mesh-cp (MYCEL_CP, or --cp, is its --http-listen):"
    );
    show_command(&mycel, &with_cp(&["status"]))?;
    show_command(&mycel, &with_cp(&["check"]))?;
    println!();
    println!("Why is a call allowed or denied? The same evaluation the nodes run:");
    for from in ["order", "analytics"] {
        let from = format!("default/{from}");
        let port = PORT.to_string();
        show_command(
            &mycel,
            &with_cp(&[
                "explain",
                "--from",
                &from,
                "--to",
                "default/payment",
                "--port",
                &port,
            ]),
        )?;
    }
    println!();
    println!("Where do order's connections to the payment Service go, and with what settings?");
    show_command(
        &mycel,
        &with_cp(&[
            "explain",
            "--from",
            "default/order",
            "--to",
            "default/payment",
            "--port",
            "80",
        ]),
    )?;
    println!();
    println!("Look:");
    let look = |cmd: String, what: &str| println!("  {cmd:<44} # {what}");
    look(
        format!(
            "{} --cp {} stat --node {} --node {}",
            mycel.display(),
            cp.http,
            node1.metrics,
            node2.metrics
        ),
        "traffic per workload pair: connections/s, bytes/s, failures",
    );
    look(
        format!("{} --cp {} policies", mycel.display(), cp.http),
        "each AccessPolicy and the workloads it selects",
    );
    look(
        format!("curl -s http://{}/status", cp.http),
        "mesh-cp: config version and errors, nodes and their acks",
    );
    for (name, node) in [("node1", node1), ("node2", node2)] {
        look(
            format!("curl -s http://{}/debug/certs", node.admin),
            &format!("{name}: workload certificates (serial, expiry, chain) and roots"),
        );
    }
    for (name, node) in [("node1", node1), ("node2", node2)] {
        look(
            format!("curl -s http://{}/metrics", node.metrics),
            &format!("{name}: Prometheus metrics"),
        );
    }
    for (name, node) in [("node1", node1), ("node2", node2)] {
        println!("  {name} log: {}", node.log_file.display());
    }
    if let Some(p) = &prometheus {
        println!();
        println!(
            "Prometheus (scraping both nodes and mesh-cp every second): http://{}/",
            p.addr
        );
        println!("  Try these queries (Graph tab, or curl the API):");
        for (what, query) in DEMO_QUERIES {
            println!("  # {what}");
            println!("  {query}");
            println!(
                "    curl -s 'http://{}/api/v1/query' --data-urlencode 'query={query}'",
                p.addr
            );
        }
    }
    println!(
        "  nsenter --net={} sh -c 'echo $$ > {}/cgroup.procs; exec bash'",
        order.netns_path().display(),
        order.cgroup.display()
    );
    println!("      then: curl http://{VIP}/whoami   # from order, through the tunnel to payment");
    println!("  {edit}");
    println!("  cargo xtask clean   # if this process is ever killed");
    println!();
    println!("Every 2 s: order calls payment (pod IP and VIP, across nodes) and inventory; analytics calls payment; order opens {SPLIT_SAMPLE} connections to payment's VIP and counts who answered (the canary's split). Ctrl-C tears everything down.");

    let deadline = duration.map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        let mut line = Vec::new();
        for (what, url) in [
            ("payment", format!("http://{}:{PORT}/whoami", payment.ipv4)),
            ("payment VIP", format!("http://{VIP}:80/whoami")),
            (
                "inventory",
                format!("http://{}:{PORT}/whoami", inventory.ipv4),
            ),
        ] {
            let out = app::run(order, &["get", &url], Duration::from_secs(10));
            line.push(format!("order -> {what}: HTTP {}", out["status"]));
        }
        let probe = app::run(
            analytics,
            &["probe", &payment.ipv4.to_string(), &PORT.to_string()],
            Duration::from_secs(10),
        );
        line.push(format!(
            "analytics -> payment: {}",
            match probe["outcome"].as_str() {
                Some("eperm") => "denied (connect refused in node1's kernel)".to_owned(),
                other => other.unwrap_or("?").to_owned(),
            }
        ));
        let split = app::run(
            order,
            &[
                "tally",
                VIP,
                "90",
                &SPLIT_SAMPLE.to_string(),
                "4",
                "10",
                "10",
            ],
            Duration::from_secs(30),
        );
        let took = |name: &str| split["counts"][name].as_u64().unwrap_or(0);
        line.push(format!(
            "canary split: payment {} / payment-v2 {} of {SPLIT_SAMPLE}",
            took("payment"),
            took("payment-v2")
        ));
        let (s1, s2) = (
            node1.stats().unwrap_or_default(),
            node2.stats().unwrap_or_default(),
        );
        let stat =
            |s: &std::collections::BTreeMap<String, u64>, k: &str| s.get(k).copied().unwrap_or(0);
        println!(
            "{}; node1 tunnels_out={} fast_denied={}; node2 tunnels_in={} denied={}",
            line.join(", "),
            stat(&s1, "tunnels_out"),
            stat(&s1, "ebpf_fast_denied"),
            stat(&s2, "tunnels_in"),
            stat(&s2, "policy_denied"),
        );
        if deadline.is_some_and(|d| Instant::now() >= d)
            || wait_for_signal(&signals, Duration::from_secs(2))
        {
            break;
        }
    }
    println!("tearing down the sandbox");
    drop(prometheus);
    drop(nodes);
    drop(cp);
    drop(topo);
    println!("done: no namespaces, cgroups or eBPF programs left");
    Ok(())
}

/// Prints `$ BINARY ARGS` and its output, indented.
fn show_command(binary: &std::path::Path, args: &[String]) -> anyhow::Result<()> {
    println!("  $ {} {}", binary.display(), args.join(" "));
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("    {line}");
    }
    Ok(())
}

/// A payment Service: its HTTP port (80) and the port where it answers its name (90).
fn payment_service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec: {{ vips: ['{vip}'], ports: [{{ port: 80, targetPort: {PORT} }}, {{ port: 90, targetPort: {NAME_PORT} }}], selector: {{ app: {name} }} }}\n"
    )
}

/// The seeds' canary: 10 % of payment's new connections to payment-v2.
const CANARY: &str = "apiVersion: mycel.dev/v1alpha1
kind: ServiceRoute
metadata: { name: payment-canary, namespace: default }
spec:
  service: payment
  backends:
  - { service: payment, weight: 90 }
  - { service: payment-v2, weight: 10 }
";

/// The seeds' scenario: analytics must not call payment.
const BLOCK_ANALYTICS: &str = "apiVersion: mycel.dev/v1alpha1
kind: AccessPolicy
metadata: { name: block-analytics, namespace: default }
spec:
  selector: { matchLabels: { app: payment } }
  action: Deny
  rules:
  - sourceIdentities: [\"spiffe://cluster.local/ns/default/sa/analytics\"]
";

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// True when SIGINT or SIGTERM arrived within `timeout`.
fn wait_for_signal(set: &libc::sigset_t, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; no siginfo requested.
    unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) > 0 }
}

/// Three queries to try on the sandbox's Prometheus: what the dashboard shows first.
const DEMO_QUERIES: [(&str, &str); 3] = [
    (
        "bytes per second between workload pairs, as their destinations saw them",
        r#"sum by (source_workload, destination_workload) (rate(mycel_tcp_sent_bytes_total{reporter="destination"}[1m]))"#,
    ),
    (
        "connects refused in the source node's kernel (analytics -> payment)",
        r#"sum by (instance) (mycel_ebpf_events_total{event="fast_denied"})"#,
    ),
    (
        "seconds until each workload certificate expires",
        r#"min by (identity) (mycel_certificate_expiry_timestamp_seconds) - time()"#,
    ),
];

/// A Prometheus server for the sandbox when the `prometheus` binary is there; the sandbox runs
/// without it otherwise.
fn start_prometheus(
    prefix: &str,
    cp: &ControlPlane,
    node1: &MeshNode,
    node2: &MeshNode,
) -> Option<PrometheusServer> {
    let targets = [
        (NODE_JOB, node1.metrics),
        (NODE_JOB, node2.metrics),
        (CP_JOB, cp.metrics),
    ];
    match PrometheusServer::start(prefix, &targets) {
        Ok(p) => Some(p),
        Err(e) => {
            println!(
                "xtask: no Prometheus for the sandbox ({e}); the metrics endpoints still answer"
            );
            None
        }
    }
}
