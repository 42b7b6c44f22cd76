//! `cargo xtask up`: a sandbox mesh until Ctrl-C: mesh-cp, two nodes, and demo pods talking
//! across them through the tunnel, by pod IP, by service VIP and on the same node.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_tests::{
    app::{self, Server},
    mesh::{service_yaml, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";

pub fn run(duration: Option<u64>) -> anyhow::Result<()> {
    crate::prereqs::ensure_all()?;
    crate::build_bins()?;
    // Block SIGINT/SIGTERM here and collect them with sigtimedwait, so that Ctrl-C always ends
    // in the teardown below (children start with the default mask: std resets it).
    let signals = block_stop_signals();

    let topo = Topology::with_prefix(
        "mycel-up",
        &[
            NodeSpec::new("node1", &["web", "cache", "db"]),
            NodeSpec::new("node2", &["api"]),
        ],
    )
    .map_err(|e| anyhow::anyhow!("creating the sandbox: {e}"))?;
    let (web, cache, db, api) = (
        topo.pod("web"),
        topo.pod("cache"),
        topo.pod("db"),
        topo.pod("api"),
    );
    let _servers = [
        Server::start(api, PORT).context("starting the demo server in pod api")?,
        Server::start(cache, PORT).context("starting the demo server in pod cache")?,
    ];
    let config = format!(
        "{}---\n{}",
        workloads_yaml(&[web, cache, api]),
        service_yaml("api", VIP, 80, PORT, "api")
    );
    let cp =
        ControlPlane::start(&topo.prefix, &[("mesh.yaml", &config)]).context("starting mesh-cp")?;
    let mut nodes = Vec::new();
    for (name, enrolled) in [("node1", 2), ("node2", 1)] {
        let mut node = MeshNode::connect(topo.node(name), &cp, None, &[])
            .with_context(|| format!("starting mesh-node on {name}"))?;
        node.wait_for(Duration::from_secs(30), |s| {
            s.get("enrolled_workloads") == Some(&enrolled) && s.get("svids") == Some(&enrolled)
        })
        .with_context(|| format!("waiting for mesh-node on {name}"))?;
        nodes.push(node);
    }
    let (node1, node2) = (&nodes[0], &nodes[1]);

    println!();
    println!("Mycel sandbox is up:");
    println!(
        "  node1: web ({}), cache ({}), db ({}, not in the mesh)",
        web.ipv4, cache.ipv4, db.ipv4
    );
    println!("  node2: api ({})", api.ipv4);
    println!("  service api: {VIP}:80 -> api:{PORT}");
    println!(
        "  mesh-cp: config dir {}, data dir {}, log {}",
        cp.config_dir.display(),
        cp.data_dir.display(),
        cp.log_file().display()
    );
    println!();
    println!("Look:");
    let look = |cmd: String, what: &str| println!("  {cmd:<44} # {what}");
    look(
        format!("curl -s http://{}/status", cp.http),
        "mesh-cp: config version and errors, nodes and their acks",
    );
    for (name, node) in [("node1", node1), ("node2", node2)] {
        look(
            format!("curl -s http://{}/certs", node.admin),
            &format!("{name}: workload certificates (serial, expiry, renewal)"),
        );
        look(
            format!("curl -s http://{}/stats", node.admin),
            &format!("{name}: counters (eBPF, proxy, tunnels, certificates)"),
        );
    }
    for (name, node) in [("node1", node1), ("node2", node2)] {
        println!("  {name} log: {}", node.log_file.display());
    }
    println!(
        "  nsenter --net={} sh -c 'echo $$ > {}/cgroup.procs; exec bash'",
        web.netns_path().display(),
        web.cgroup.display()
    );
    println!("      then: curl http://{VIP}/whoami   # from web, through the tunnel to api");
    println!(
        "  edit or add YAML in {}: mesh-cp applies it; a bad file is reported on /status",
        cp.config_dir.display()
    );
    println!("  cargo xtask clean   # if this process is ever killed");
    println!();
    println!("Pod web calls api (pod IP and VIP, across nodes) and cache (same node) every 2 s. Ctrl-C tears everything down.");

    let deadline = duration.map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        let mut line = Vec::new();
        for (what, url) in [
            ("api", format!("http://{}:{PORT}/whoami", api.ipv4)),
            ("api VIP", format!("http://{VIP}:80/whoami")),
            ("cache", format!("http://{}:{PORT}/whoami", cache.ipv4)),
        ] {
            let out = app::run(web, &["get", &url], Duration::from_secs(10));
            line.push(format!("web -> {what}: HTTP {}", out["status"]));
        }
        let (s1, s2) = (
            node1.stats().unwrap_or_default(),
            node2.stats().unwrap_or_default(),
        );
        let stat =
            |s: &std::collections::BTreeMap<String, u64>, k: &str| s.get(k).copied().unwrap_or(0);
        println!(
            "{}; node1 tunnels_out={} same_node={}; node2 tunnels_in={}",
            line.join(", "),
            stat(&s1, "tunnels_out"),
            stat(&s1, "proxy_same_node"),
            stat(&s2, "tunnels_in"),
        );
        if deadline.is_some_and(|d| Instant::now() >= d)
            || wait_for_signal(&signals, Duration::from_secs(2))
        {
            break;
        }
    }
    println!("tearing down the sandbox");
    drop(nodes);
    drop(cp);
    drop(topo);
    println!("done: no namespaces, cgroups or eBPF programs left");
    Ok(())
}

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
