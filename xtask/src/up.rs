//! `cargo xtask up`: a sandbox mesh until Ctrl-C: mesh-cp, two nodes, and the seeds' scenario:
//! order calls payment (pod IP and service VIP, through the tunnel) and inventory; analytics is
//! denied payment by an AccessPolicy, in its own node's kernel. With Prometheus installed, a
//! server on loopback scrapes both nodes and the control plane.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_tests::{
    app::{self, Server},
    mesh::{service_yaml, sibling_bin, workloads_yaml},
    prom::{PrometheusServer, CP_JOB, NODE_JOB},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";

pub fn run(duration: Option<u64>) -> anyhow::Result<()> {
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
            NodeSpec::new("node2", &["payment", "inventory"]),
        ],
    )
    .map_err(|e| anyhow::anyhow!("creating the sandbox: {e}"))?;
    let (order, analytics, db, payment, inventory) = (
        topo.pod("order"),
        topo.pod("analytics"),
        topo.pod("db"),
        topo.pod("payment"),
        topo.pod("inventory"),
    );
    let _servers = [
        Server::start(payment, PORT).context("starting the demo server in pod payment")?,
        Server::start(inventory, PORT).context("starting the demo server in pod inventory")?,
    ];
    let config = format!(
        "{}---\n{}",
        workloads_yaml(&[order, analytics, payment, inventory]),
        service_yaml("payment", VIP, 80, PORT, "payment")
    );
    let cp = ControlPlane::start(
        &topo.prefix,
        &[
            ("mesh.yaml", &config),
            ("block-analytics.yaml", BLOCK_ANALYTICS),
        ],
    )
    .context("starting mesh-cp")?;
    let mut nodes = Vec::new();
    for (name, enrolled) in [("node1", 2), ("node2", 2)] {
        let mut node = MeshNode::connect(topo.node(name), &cp, None, &[])
            .with_context(|| format!("starting mesh-node on {name}"))?;
        node.wait_for(Duration::from_secs(30), |s| {
            s.get("enrolled_workloads") == Some(&enrolled) && s.get("svids") == Some(&enrolled)
        })
        .with_context(|| format!("waiting for mesh-node on {name}"))?;
        nodes.push(node);
    }
    let (node1, node2) = (&nodes[0], &nodes[1]);
    let prometheus = start_prometheus(&topo.prefix, &cp, node1, node2);

    println!();
    println!("Mycel sandbox is up:");
    println!(
        "  node1: order ({}), analytics ({}), db ({}, not in the mesh)",
        order.ipv4, analytics.ipv4, db.ipv4
    );
    println!(
        "  node2: payment ({}), inventory ({})",
        payment.ipv4, inventory.ipv4
    );
    println!("  service payment: {VIP}:80 -> payment:{PORT}");
    println!(
        "  policy default/block-analytics: Deny analytics -> payment ({}/block-analytics.yaml)",
        cp.config_dir.display()
    );
    println!(
        "  mesh-cp: config dir {}, data dir {}, log {}",
        cp.config_dir.display(),
        cp.data_dir.display(),
        cp.log_file().display()
    );
    println!();
    println!("Why is a call allowed or denied? The same evaluation the nodes run:");
    let mesh_cp = sibling_bin("mesh-cp", "MESH_CP_BIN");
    for from in ["order", "analytics"] {
        let args = [
            "explain".to_owned(),
            "--from".to_owned(),
            format!("default/{from}"),
            "--to".to_owned(),
            "default/payment".to_owned(),
            "--port".to_owned(),
            PORT.to_string(),
            "--cp".to_owned(),
            cp.http.to_string(),
        ];
        println!("  $ {} {}", mesh_cp.display(), args.join(" "));
        let out = std::process::Command::new(&mesh_cp)
            .args(&args)
            .output()
            .context("running mesh-cp explain")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("    {line}");
        }
    }
    println!();
    println!("Look:");
    let look = |cmd: String, what: &str| println!("  {cmd:<44} # {what}");
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
    println!(
        "  edit or add YAML in {}: mesh-cp applies it; a bad file is reported on /status",
        cp.config_dir.display()
    );
    println!("  cargo xtask clean   # if this process is ever killed");
    println!();
    println!("Every 2 s: order calls payment (pod IP and VIP, across nodes) and inventory; analytics calls payment. Ctrl-C tears everything down.");

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
