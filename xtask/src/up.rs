//! `cargo xtask up`: a one-node sandbox mesh with a demo client and server, until Ctrl-C.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_tests::{
    app::{self, Server},
    mesh::workloads_yaml,
    MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;

pub fn run(duration: Option<u64>) -> anyhow::Result<()> {
    crate::prereqs::ensure_all()?;
    crate::build_bins()?;
    // Block SIGINT/SIGTERM here and collect them with sigtimedwait, so that Ctrl-C always ends
    // in the teardown below (children start with the default mask: std resets it).
    let signals = block_stop_signals();

    let topo = Topology::with_prefix("mycel-up", &[NodeSpec::new("node1", &["web", "api", "db"])])
        .map_err(|e| anyhow::anyhow!("creating the sandbox: {e}"))?;
    let (web, api, db) = (topo.pod("web"), topo.pod("api"), topo.pod("db"));
    let _server = Server::start(api, PORT).context("starting the demo server in pod api")?;
    let mut node = MeshNode::start(topo.node("node1"), &workloads_yaml(&[web, api]), None, &[])
        .context("starting mesh-node")?;
    node.wait_enrolled(2).context("waiting for mesh-node")?;

    println!();
    println!(
        "Mycel sandbox is up: node1 with pods web ({}), api ({}), db ({})",
        web.ipv4, api.ipv4, db.ipv4
    );
    println!("  enrolled: web, api (db is not enrolled and connects directly)");
    println!(
        "  demo server: http://{}:{PORT}/whoami in pod api",
        api.ipv4
    );
    println!("  mesh-node log: {}", node.log_file.display());
    println!();
    println!("Try:");
    println!("  curl -s http://{}/stats                 # counters: redirected, skipped, map-full, proxy", node.admin);
    println!(
        "  nsenter --net={} sh -c 'echo $$ > {}/cgroup.procs; exec bash'",
        web.netns_path().display(),
        web.cgroup.display()
    );
    println!(
        "      then: curl http://{}:{PORT}/whoami   # goes through the node proxy",
        api.ipv4
    );
    println!("  cargo xtask clean                      # if this process is ever killed");
    println!();
    println!("Demo client in pod web calls api every 2 s. Ctrl-C tears everything down.");

    let deadline = duration.map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        let out = app::run(
            web,
            &["get", &format!("http://{}:{PORT}/whoami", api.ipv4)],
            Duration::from_secs(10),
        );
        let stats = node.stats().unwrap_or_default();
        println!(
            "web -> api {}:{PORT}: HTTP {}, getpeername {}, server saw {}; redirected={} proxied={}",
            api.ipv4,
            out["status"],
            out["peer"][0].as_str().unwrap_or("?"),
            out["body"].as_str().unwrap_or("?"),
            stats.get("ebpf_redirected").copied().unwrap_or(0),
            stats.get("proxy_forwarded").copied().unwrap_or(0),
        );
        if deadline.is_some_and(|d| Instant::now() >= d)
            || wait_for_signal(&signals, Duration::from_secs(2))
        {
            break;
        }
    }
    println!("tearing down the sandbox");
    drop(node);
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
