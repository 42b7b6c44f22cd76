//! mesh-node's lifecycle: runtime enrollment changes, bad input, restart and shutdown.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_node_bin, workloads_yaml},
    MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

/// Programs attached directly to `cgroup`, as bpftool reports them: (attach type, name).
fn attached(cgroup: &std::path::Path) -> Vec<(String, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("bpftool json");
    let mut out: Vec<(String, String)> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or("").to_string(),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Runs `mesh-node run` for node n0 in the foreground and collects its exit and output; for
/// starts that are expected to fail.
fn run_once(node: &mesh_tests::topology::Node, workloads: &Path) -> std::process::Output {
    run_once_in(node, workloads, &node.cgroup)
}

fn run_once_in(
    node: &mesh_tests::topology::Node,
    workloads: &Path,
    cgroup: &Path,
) -> std::process::Output {
    let mut cmd = Command::new(mesh_node_bin());
    cmd.args(["run", "--node-name", "n0", "--admin-listen", "127.0.0.1:0"])
        .arg("--workloads")
        .arg(workloads)
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--bpffs")
        .arg(&node.bpffs);
    mesh_tests::mesh::run_alone(node, &mut cmd).expect("run mesh-node")
}

#[test]
fn unenrolling_at_runtime_stops_redirecting_new_connections() {
    let topo = Topology::new(&[NodeSpec::new("n0", &["a", "b"])]).expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let _server = Server::start(b, PORT).unwrap();
    let mut node = MeshNode::start(topo.node("n0"), &workloads_yaml(&[a, b]), None, &[]).unwrap();
    node.wait_enrolled(2).unwrap();
    app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(node.stat("ebpf_redirected"), 1);

    node.write_workloads(&workloads_yaml(&[b])).unwrap();
    node.wait_enrolled(1).unwrap();
    let out = app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(out["body"], a.ipv4.to_string());
    assert_eq!(node.stat("ebpf_redirected"), 1, "a is no longer captured");
    assert_eq!(node.stat("ebpf_skipped_not_enrolled"), 1);

    // And back again, without a restart.
    node.write_workloads(&workloads_yaml(&[a, b])).unwrap();
    node.wait_enrolled(2).unwrap();
    app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(node.stat("ebpf_redirected"), 2);
}

#[test]
fn bad_workloads_file_at_runtime_keeps_last_good_state() {
    let topo = Topology::new(&[NodeSpec::new("n0", &["a", "b"])]).expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let _server = Server::start(b, PORT).unwrap();
    let good = workloads_yaml(&[a, b]);
    let mut node = MeshNode::start(topo.node("n0"), &good, None, &[]).unwrap();
    node.wait_enrolled(2).unwrap();

    let bad_inputs = [
        "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: [not, a, map\n".to_string(),
        // One valid workload plus one whose netns does not exist: nothing may be applied.
        format!(
            "{}---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: ghost }}\nspec: {{ node: n0, netns: /run/netns/{}-does-not-exist }}\n",
            workloads_yaml(&[b]),
            topo.prefix
        ),
    ];
    for (i, bad) in bad_inputs.iter().enumerate() {
        node.write_workloads(bad).unwrap();
        node.wait_for(T, |s| s["config_errors"] == i as u64 + 1)
            .unwrap();
        assert_eq!(node.stat("enrolled_workloads"), 2, "last good state kept");
        // Still capturing pod a.
        let before = node.stat("ebpf_redirected");
        app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
        assert_eq!(node.stat("ebpf_redirected"), before + 1);
    }
    let log = node.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("workloads file rejected"))
        .collect();
    assert_eq!(errors.len(), 2, "one line per rejected file:\n{log}");
    assert!(
        errors[0].contains("workloads.yaml: document 1"),
        "{}",
        errors[0]
    );
    assert!(errors[1].contains("does-not-exist"), "{}", errors[1]);
}

#[test]
fn bad_input_at_start_is_one_line_and_non_zero_exit() {
    let topo = Topology::new(&[NodeSpec::new("n0", &["a"])]).expect("topology");
    let dir = std::env::temp_dir().join(format!("{}-badstart", topo.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("w.yaml");
    let cases = [
        ("kind: Workload\napiVersion: mycel.dev/v1alpha1\nmetadata: {name: a}\nspec: {node: n0, netns: /run/netns/none-such-mycel}\n", "none-such-mycel"),
        ("{{{{", "w.yaml: document 1"),
    ];
    for (text, needle) in cases {
        std::fs::write(&file, text).unwrap();
        let out = run_once(topo.node("n0"), &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(needle), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A --cgroup that is not there, or not cgroup v2, says what to name instead (it was "No
    // such file or directory").
    std::fs::write(&file, "").unwrap();
    let node = topo.node("n0");
    for (cgroup, needle) in [
        (node.cgroup.join("not-here"), "does not exist: --cgroup must name a directory of the host's cgroup v2 hierarchy (mounted at"),
        (PathBuf::from("/proc"), "is not in a cgroup v2 hierarchy"),
    ] {
        let out = run_once_in(node, &file, &cgroup);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("mesh-node: error: ") && last.contains(needle), "{stderr}");
    }
    // Nothing stays attached after a failed start.
    assert!(attached(&topo.node("n0").cgroup).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `mesh-node uninstall` for node n0 of `node`'s topology, run to its end.
fn uninstall(node: &mesh_tests::topology::Node) -> std::process::Output {
    uninstall_on(node, &node.cgroup)
}

/// `mesh-node uninstall` for node n0 with `--cgroup cgroup`.
fn uninstall_on(node: &mesh_tests::topology::Node, cgroup: &Path) -> std::process::Output {
    let mut cmd = Command::new(mesh_node_bin());
    cmd.args(["uninstall", "--node-name", "n0", "--cgroup"])
        .arg(cgroup)
        .arg("--bpffs")
        .arg(&node.bpffs);
    mesh_tests::mesh::run_alone(node, &mut cmd).expect("run mesh-node uninstall")
}

/// What a connect from `from` to `to:PORT` comes to (`app.py probe`).
fn probe(from: &mesh_tests::topology::Pod, to: &mesh_tests::topology::Pod) -> String {
    let out = app::run(from, &["probe", &to.ipv4.to_string(), &PORT.to_string()], T);
    out["outcome"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn pods_stay_captured_without_a_daemon_and_the_next_one_takes_the_links_over() {
    let topo = Topology::new(&[NodeSpec::new("n0", &["a", "b"])]).expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let node = topo.node("n0");
    let cg = node.cgroup.clone();
    let _server = Server::start(b, PORT).unwrap();
    let yaml = workloads_yaml(&[a, b]);
    let expected: Vec<(String, String)> = {
        let mut v: Vec<(String, String)> = [
            ("cgroup_inet4_connect", "mycel_connect4"),
            ("cgroup_inet6_connect", "mycel_connect6"),
            ("cgroup_inet4_getpeername", "mycel_getpeer4"),
            ("cgroup_inet6_getpeername", "mycel_getpeer6"),
            ("cgroup_sock_ops", "mycel_sockops"),
        ]
        .iter()
        .map(|(t, n)| (t.to_string(), n.to_string()))
        .collect();
        v.sort();
        v
    };

    let mut first = MeshNode::start(node, &yaml, None, &[]).unwrap();
    first.wait_enrolled(2).unwrap();
    assert_eq!(attached(&cg), expected);
    assert!(first.log().contains("links_attached=5"), "{}", first.log());
    // A second daemon on the same cgroup takes over from the first (restart.rs); one that
    // cannot, because the first does not answer (hung), is refused rather than doubling the
    // redirects. So is an uninstall under a running daemon.
    let pid = first.pid().expect("running") as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let second = run_once(node, &first.workloads_file);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot take over from the mesh-node running on this node"),
        "{stderr}"
    );
    let refused = uninstall(node);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another mesh-node already owns"));
    // Regression (issue 21 review): the lock is per cgroup, the pins per node, so an
    // uninstall given another cgroup (the default is the cgroup2 root) removed a running
    // daemon's pins. The daemons the pins name are looked for now.
    let elsewhere = uninstall_on(node, &topo.cgroup_root);
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert_eq!(elsewhere.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a mesh-node for node n0 runs in cgroup"),
        "{stderr}"
    );
    assert_eq!(attached(&cg), expected, "nothing was removed");

    // A crash: the pinned links keep the programs on the cgroup, and a's connects are refused
    // (nothing listens on the proxy's port) rather than sent around the mesh.
    first.stop_with(libc::SIGKILL).unwrap();
    assert_eq!(attached(&cg), expected, "a crash detaches nothing");
    assert_eq!(probe(a, b), "refused");

    let mut again = MeshNode::start(node, &yaml, None, &[]).unwrap();
    again.wait_enrolled(2).unwrap();
    let log = again.log();
    assert!(
        log.contains("adopted_maps=true") && log.contains("links_taken_over=5"),
        "{log}"
    );
    // The daemon's claim on the cgroup: a crash leaves it (the flock dies with the process),
    // a clean stop removes it.
    let lock = {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&cg).unwrap();
        std::path::PathBuf::from(format!(
            "/run/mycel/cgroup-{}-{}.lock",
            meta.dev(),
            meta.ino()
        ))
    };
    assert!(lock.exists(), "{} while the daemon runs", lock.display());
    assert_eq!(
        attached(&cg),
        expected,
        "exactly one attachment of each program"
    );
    let before = again.stat("ebpf_redirected");
    let out = app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(out["body"], a.ipv4.to_string());
    assert_eq!(again.stat("ebpf_redirected"), before + 1);

    // A clean stop leaves the pods captured too.
    let status = again.stop_with(libc::SIGTERM).unwrap();
    assert!(status.success(), "{status}: {}", again.log());
    assert!(again.log().contains("stay captured"), "{}", again.log());
    assert!(!lock.exists(), "{} is left behind", lock.display());
    assert_eq!(attached(&cg), expected, "SIGTERM detaches nothing");
    assert_eq!(probe(a, b), "refused");

    // A layout change (here the original-destination maps' capacity): the next daemon makes
    // new maps, carries over what the old ones held, and unpins them.
    let maps_dirs = || {
        std::fs::read_dir(node.bpffs.join("mycel/n0"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("maps-"))
            .count()
    };
    let mut third = MeshNode::start(node, &yaml, None, &["--orig-dst-capacity", "4096"]).unwrap();
    third.wait_enrolled(2).unwrap();
    let log = third.log();
    assert!(
        log.contains("adopted_maps=false") && log.contains("(\"ENROLLED\", 2)"),
        "{log}"
    );
    assert_eq!(maps_dirs(), 1, "the old layout's maps are unpinned");
    let before = third.stat("ebpf_redirected");
    let out = app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(out["body"], a.ipv4.to_string());
    assert_eq!(third.stat("ebpf_redirected"), before + 1);
    assert!(third.stop_with(libc::SIGTERM).unwrap().success());

    // Uninstall takes it all off: a reaches b directly, outside the mesh.
    let out = uninstall(node);
    assert!(out.status.success(), "{out:?}");
    assert!(attached(&cg).is_empty(), "uninstall detaches everything");
    assert!(!node.bpffs.join("mycel").exists(), "no pins left");
    let out = app::run(a, &["get", &format!("http://{}:{PORT}/whoami", b.ipv4)], T);
    assert_eq!(out["body"], a.ipv4.to_string());
    let again = uninstall(node);
    assert!(
        again.status.success(),
        "a second uninstall changes nothing: {again:?}"
    );
    assert!(!lock.exists(), "uninstall leaves no lock behind");
}
