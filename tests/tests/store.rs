//! Universal mode on several hosts: two mesh-cp replicas keeping the mesh in a real etcd
//! (Debian's etcd-server, on loopback, its data in the test's directory), each serving one
//! node. Objects are written with `mesh-cp apply` and `mesh-cp delete`, and the nodes
//! enforce what either replica serves.

use std::time::Duration;

use mesh_tests::{
    app::{self, Server},
    etcd::{self, Etcd},
    mesh::{http_get, http_get_any, mesh_config_yaml, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(30);
const TD: &str = "spiffe://cluster.local/ns/default/sa";

fn deny_order(name: &str, action: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{ name: {name}, namespace: default }}\nspec: {{ selector: {{ matchLabels: {{ app: payment }} }}, action: {action}, rules: [{{ sourceIdentities: ['{TD}/order'] }}] }}\n"
    )
}

/// One "ping" connection from order to payment; true when it got "pong".
fn connects(topo: &Topology) -> bool {
    let ip = topo.pod("payment").ipv4.to_string();
    let out = app::run(topo.pod("order"), &["loop", &ip, &PORT.to_string(), "1"], T);
    out["failures"] == 0
}

/// Waits until every control plane in `cps` serves a version of at least `version` and
/// each node in `nodes` (name, its control plane) acknowledged it; the versions they serve.
fn wait_everywhere(
    cps: &mut [&mut ControlPlane],
    version: u64,
    nodes: &[(&str, usize)],
) -> Vec<u64> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let statuses: Vec<serde_json::Value> =
            cps.iter().map(|cp| cp.status().expect("/status")).collect();
        let served: Vec<u64> = statuses
            .iter()
            .map(|s| s["config"]["version"].as_u64().unwrap_or(0))
            .collect();
        let acked = nodes.iter().all(|(node, cp)| {
            statuses[*cp]["nodes"][node]["acked_version"].as_u64() >= Some(version)
        });
        if served.iter().all(|v| *v >= version) && acked {
            return served;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not everywhere at {version} within {T:?}: {statuses:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a refused apply: a moment later, every replica in `cps` still serves `version` and
/// no policy named `policy`.
fn nothing_written(cps: &[&ControlPlane], version: u64, policy: &str) {
    std::thread::sleep(Duration::from_millis(500));
    for cp in cps {
        assert_eq!(
            cp.version().expect("version"),
            version,
            "nothing was written"
        );
        let policies = http_get(cp.http, "/policies").expect("/policies");
        assert!(!policies.contains(policy), "{policies}");
    }
}

/// `mycel --cp CP check`: whether it passed, and what it printed.
fn mycel_check(cp: &str) -> (bool, String) {
    let out = std::process::Command::new(mesh_tests::mesh::sibling_bin("mycel", "MYCEL_BIN"))
        .args(["--cp", cp, "check"])
        .output()
        .expect("run mycel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn written_version(stderr_or_out: &str) -> u64 {
    stderr_or_out
        .lines()
        .find_map(|l| l.strip_prefix("config version "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version written in {stderr_or_out:?}"))
}

/// Two replicas on one etcd, a node on each: what is applied through either is served by
/// both at the same version (the store's revision) and enforced by both nodes; a bad object
/// is refused with its file, document and field, and nothing of its file reaches the
/// store; etcd gone for 30 s leaves the data plane as it was, is reported by each replica
/// (readiness, metric, status, log), and the replicas follow the store again by themselves.
#[test]
fn replicas_on_etcd_serve_one_config_and_ride_out_its_absence() {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["order"]),
        NodeSpec::new("n2", &["payment"]),
    ])
    .expect("topology");
    let _server = Server::start(topo.pod("payment"), PORT).expect("payment");
    let mut etcd = Etcd::start(&topo.prefix).expect("etcd");
    let ca = etcd::shared_ca(&topo.prefix).expect("a CA for both replicas");
    let mut a = ControlPlane::start_etcd(&format!("{}-a", topo.prefix), &etcd, &ca.files())
        .expect("replica a");
    let mut b = ControlPlane::start_etcd(&format!("{}-b", topo.prefix), &etcd, &ca.files())
        .expect("replica b");

    let pods = ["order", "payment"].map(|p| topo.pod(p));
    let mesh = format!(
        "{}---\n{}",
        workloads_yaml(&pods),
        mesh_config_yaml("tls", "")
    );
    let (out, _) = a
        .store_cmd("apply", "mesh.yaml", &mesh)
        .expect("apply the mesh");
    assert!(out.contains("Workload default/order created"), "{out}");
    assert!(out.contains("MeshConfig created"), "{out}");
    let n1 = MeshNode::join(&mut topo, "n1", &a, 1).expect("mesh-node n1 on replica a");
    let n2 = MeshNode::join(&mut topo, "n2", &b, 1).expect("mesh-node n2 on replica b");
    assert!(connects(&topo), "order reaches payment");

    // `mycel check` over both replicas sees each node on the replica it streams from; over
    // one, the other's node has never connected there.
    let both = format!("{},{}", a.http, b.http);
    let (passed, out) = mycel_check(&both);
    assert!(passed, "{out}");
    assert!(
        out.contains("ok    node n1") && out.contains("ok    node n2"),
        "{out}"
    );
    let (passed, out) = mycel_check(&a.http.to_string());
    assert!(
        !passed && out.contains("node n2: has never connected"),
        "{out}"
    );

    // A deny written through b: both replicas serve it at the version apply wrote.
    let out = b
        .store_cmd("apply", "deny.yaml", &deny_order("no-order", "Deny"))
        .expect("apply the deny");
    assert!(
        out.0.contains("AccessPolicy default/no-order created"),
        "{out:?}"
    );
    let version = written_version(&out.1);
    // The deny concerns payment's node; n1 gets nothing new to acknowledge.
    let served = wait_everywhere(&mut [&mut a, &mut b], version, &[("n2", 1)]);
    assert_eq!(served, [version, version], "one version for one config");
    assert!(!connects(&topo), "the deny is enforced");
    // The same again changes nothing and writes no version.
    let again = b
        .store_cmd("apply", "deny.yaml", &deny_order("no-order", "Deny"))
        .expect("apply again");
    assert!(
        again.0.contains("unchanged") && again.1.contains("nothing changed"),
        "{again:?}"
    );

    // A file with a good object and a bad one: refused whole, naming document and field.
    let bad = format!(
        "{}---\n{}",
        deny_order("another", "Deny"),
        deny_order("broken", "Maybe")
    );
    let err = a
        .store_cmd("apply", "bad.yaml", &bad)
        .expect_err("a bad object is refused")
        .to_string();
    assert!(
        err.contains("bad.yaml: document 2") && err.contains("action"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    nothing_written(&[&a, &b], version, "another");

    // A file that checks alone but clashes with what the store holds (an address in use) is
    // refused whole as well, naming both.
    let impostor = format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: impostor }}\nspec: {{ node: n1, netns: /run/netns/impostor, addresses: ['{}'] }}\n",
        topo.pod("payment").ipv4
    );
    let clash = format!("{}---\n{impostor}", deny_order("third", "Deny"));
    let err = b
        .store_cmd("apply", "clash.yaml", &clash)
        .expect_err("a clash is refused")
        .to_string();
    assert!(
        err.contains("nothing was written") && err.contains("impostor") && err.contains("payment"),
        "{err}"
    );
    nothing_written(&[&a, &b], version, "third");

    // etcd away for 30 s: the nodes keep what they hold, the replicas say so.
    etcd.kill().expect("kill etcd");
    let gone = std::time::Instant::now();
    for cp in [&mut a, &mut b] {
        let http = cp.http;
        cp.daemon()
            .wait_until(T, "readiness to say etcd is away", || {
                let (code, body) = http_get_any(http, "/readyz").ok()?;
                (code == 503 && body.contains("etcd")).then_some(())
            })
            .expect("not ready while etcd is away");
        let status = cp.status().expect("/status");
        assert_eq!(status["store"]["reachable"], false, "{status}");
        let metrics = http_get(cp.metrics, "/metrics").expect("/metrics");
        assert!(
            metrics.lines().any(|l| l == "mycel_cp_store_reachable 0"),
            "{metrics}"
        );
        assert!(cp.log().contains("etcd unreachable"), "{}", cp.log());
    }
    while gone.elapsed() < Duration::from_secs(30) {
        assert!(!connects(&topo), "the deny stays in force without etcd");
        std::thread::sleep(Duration::from_secs(2));
    }
    etcd.resume().expect("etcd back");
    for cp in [&mut a, &mut b] {
        let http = cp.http;
        cp.daemon()
            .wait_until(T, "ready again", || http_get(http, "/readyz").ok())
            .expect("ready once etcd answers");
    }

    // And the replicas follow the store again: a delete through a reaches both nodes.
    let out = a
        .store_cmd("delete", "deny.yaml", &deny_order("no-order", "Deny"))
        .expect("delete the deny");
    assert!(
        out.0.contains("AccessPolicy default/no-order deleted"),
        "{out:?}"
    );
    let version = written_version(&out.1);
    wait_everywhere(&mut [&mut a, &mut b], version, &[("n2", 1)]);
    assert!(connects(&topo), "allowed again");
    drop((n1, n2, a, b, etcd, ca));
}

/// Which of `cps` `node` streams from now, if any.
fn streaming_from(cps: &[&ControlPlane], node: &str) -> Option<usize> {
    cps.iter().position(|cp| {
        cp.status()
            .is_ok_and(|s| s["nodes"][node]["streams"].as_u64() > Some(0))
    })
}

/// `mycel_cp_config_pushes_total{kind}` of `cp`.
fn pushes(cp: &ControlPlane, kind: &str) -> f64 {
    let text = http_get(cp.metrics, "/metrics").expect("/metrics");
    mesh_telemetry::exposition::Exposition::parse(&text)
        .expect("exposition")
        .sum("mycel_cp_config_pushes_total", &[("kind", kind)])
}

/// Nodes that name both replicas (`--cp A,B`, join tokens kept in etcd): killing the replica
/// a node streams from moves it to the other within a few seconds, resuming from the version
/// it holds (no snapshot), while connections through the mesh keep succeeding; the survivor
/// then serves it changes, and the killed replica comes back on the same store.
#[test]
fn killing_a_replica_moves_its_nodes_to_the_other_without_a_failed_connection() {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["order"]),
        NodeSpec::new("n2", &["payment"]),
    ])
    .expect("topology");
    let _server = Server::start(topo.pod("payment"), PORT).expect("payment");
    let etcd = Etcd::start(&topo.prefix).expect("etcd");
    let ca = etcd::shared_ca(&topo.prefix).expect("a CA for both replicas");
    let mut cps = [
        ControlPlane::start_etcd(&format!("{}-a", topo.prefix), &etcd, &ca.files())
            .expect("replica a"),
        ControlPlane::start_etcd(&format!("{}-b", topo.prefix), &etcd, &ca.files())
            .expect("replica b"),
    ];
    let pods = ["order", "payment"].map(|p| topo.pod(p));
    let mesh = format!(
        "{}---\n{}",
        workloads_yaml(&pods),
        mesh_config_yaml("tls", "")
    );
    cps[0]
        .store_cmd("apply", "mesh.yaml", &mesh)
        .expect("apply the mesh");
    let addrs = [cps[0].grpc, cps[1].grpc];
    // Tokens from etcd (`mesh-cp token create --etcd-endpoints`): valid on both replicas.
    let n1 = MeshNode::join_any(&mut topo, "n1", &cps[0], &addrs, 1, &[]).expect("n1");
    let n2 = MeshNode::join_any(&mut topo, "n2", &cps[1], &addrs, 1, &[]).expect("n2");
    assert!(connects(&topo), "order reaches payment");
    let on = streaming_from(&[&cps[0], &cps[1]], "n1").expect("n1 streams from a replica");
    let other = 1 - on;
    let snapshots = pushes(&cps[other], "snapshot");
    let resumes = pushes(&cps[other], "resume");

    // Connections go on, one batch after another, while the replica is killed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let ip = topo.pod("payment").ipv4.to_string();
        let order = topo.pod("order").clone();
        std::thread::spawn(move || {
            let (mut made, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = app::run(&order, &["loop", &ip, &PORT.to_string(), "20"], T);
                made += out["connections"].as_u64().unwrap_or(0);
                failed += out["failures"].as_u64().unwrap_or(20);
            }
            (made, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    cps[on]
        .daemon()
        .stop_with(libc::SIGKILL)
        .expect("kill the replica");
    let killed = std::time::Instant::now();
    let moved = loop {
        if streaming_from(&[&cps[other]], "n1").is_some() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < T,
            "n1 did not move within {T:?}:\n{}",
            n1.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (made, failed) = traffic.join().expect("traffic");
    println!(
        "n1 moved to the other replica in {moved:?}; {made} connections meanwhile, {failed} failed"
    );
    assert!(moved < Duration::from_secs(5), "moved in {moved:?}");
    assert_eq!(failed, 0, "{made} connections, {failed} failed");
    assert!(made >= 20, "traffic ran: {made}");
    assert_eq!(pushes(&cps[other], "snapshot"), snapshots, "no full resync");
    assert!(pushes(&cps[other], "resume") > resumes, "n1 resumed");

    // The survivor serves changes: a deny applied through it reaches n2 and is enforced.
    let (_, err) = cps[other]
        .store_cmd("apply", "deny.yaml", &deny_order("no-order", "Deny"))
        .expect("apply the deny");
    let version = written_version(&err);
    let survivor = &mut cps[other];
    wait_everywhere(&mut [survivor], version, &[("n2", 0)]);
    assert!(!connects(&topo), "the deny is enforced");

    // The killed replica comes back on the same store and calls the config by the same
    // version as the one that followed the changes (the store's revision has moved on since:
    // leader lease, election), so a node may move either way between them.
    cps[on].resume().expect("the replica restarts");
    let [a, b] = &mut cps;
    let served = wait_everywhere(&mut [a, b], version, &[]);
    assert_eq!(served, [version, version], "one config, one version");
    drop((n1, n2, cps, etcd, ca));
}

/// Replicas that keep the CA in etcd, sealed with a key each is given: the first to lead
/// makes it, the other loads the same root; killing the leader elects the other; and
/// certificates go on being issued and rotated with either replica down.
#[test]
fn the_leader_makes_the_ca_once_and_certificates_rotate_with_either_replica_down() {
    let mut topo = Topology::new(&[NodeSpec::new("n1", &["order"])]).expect("topology");
    let etcd = Etcd::start(&topo.prefix).expect("etcd");
    let key = etcd::sealing_key(&topo.prefix).expect("a sealing key");
    let start = |name: &str| {
        ControlPlane::start_etcd_sealed(
            &format!("{}-{name}", topo.prefix),
            &etcd,
            &key.sealing_key(),
        )
        .expect("replica")
    };
    let mut cps = [start("a"), start("b")];
    let roots: Vec<String> = cps
        .iter()
        .map(|cp| std::fs::read_to_string(cp.ca_cert()).expect("ca.crt written"))
        .collect();
    assert_eq!(roots[0], roots[1], "one root for both replicas");
    let leaders = |cps: &[ControlPlane]| -> Vec<bool> {
        cps.iter()
            .map(|cp| cp.status().expect("/status")["leader"] == true)
            .collect()
    };
    // The first leads from its first attempt; the second found the key held.
    let deadline = std::time::Instant::now() + T;
    while leaders(&cps) != [true, false] {
        assert!(std::time::Instant::now() < deadline, "{:?}", leaders(&cps));
        std::thread::sleep(Duration::from_millis(200));
    }

    // Certificates of 20 s: rotated about every 10 s.
    let mesh = format!(
        "{}---\n{}",
        workloads_yaml(&[topo.pod("order")]),
        mesh_config_yaml("tls", "certTtl: 20s")
    );
    cps[0]
        .store_cmd("apply", "mesh.yaml", &mesh)
        .expect("apply the mesh");
    let addrs = [cps[0].grpc, cps[1].grpc];
    let n1 = MeshNode::join_any(&mut topo, "n1", &cps[0], &addrs, 1, &[]).expect("n1");

    // Killed, the leader's lease (10 s) runs out before the other leads, which then takes it
    // at its next look (every 3 s); stopped in order, it lets the lease go, and the other
    // leads before the lease could have run out.
    for (down, signal, within) in [(0, libc::SIGKILL, 20), (1, libc::SIGTERM, 10)] {
        let up = 1 - down;
        assert!(leaders(&cps)[down], "replica {down} leads before it goes");
        let killed = std::time::Instant::now();
        cps[down]
            .daemon()
            .stop_with(signal)
            .expect("stop a replica");
        let before = n1.cert_serials().expect("certs");
        // Rotated at least twice by the replica left, which comes to lead (its election waits
        // for the dead one's lease to run out).
        let mut seen = vec![before.clone()];
        let mut elected = None;
        while seen.len() < 3 || elected.is_none() {
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "rotations: {seen:?}, elected: {elected:?}\n{}",
                n1.log()
            );
            let now = n1.cert_serials().expect("certs");
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            if elected.is_none() && cps[up].status().expect("/status")["leader"] == true {
                elected = Some(killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let elected = elected.unwrap_or_default();
        println!(
            "replica {down} stopped (signal {signal}): the other led {elected:?} after; certificates rotated twice within {:?}",
            killed.elapsed()
        );
        assert!(
            elected < Duration::from_secs(within),
            "elected after {elected:?}"
        );
        cps[down].resume().expect("the replica comes back");
        let root = std::fs::read_to_string(cps[down].ca_cert()).expect("ca.crt");
        assert_eq!(root, roots[0], "the same root after a restart");
    }

    // etcd loses the CA (wiped, or deleted by someone): a replica that served the old root
    // refuses to start rather than make a second root and split the mesh.
    etcd.delete("/mycel/ca").expect("delete the CA");
    cps[0]
        .daemon()
        .stop_with(libc::SIGTERM)
        .expect("stop a replica");
    let err = cps[0]
        .resume()
        .expect_err("it refuses to start")
        .to_string();
    assert!(err.contains("served a root before"), "{err}");
    drop((n1, cps, etcd, key));
}

/// `mesh-cp apply` and `delete` serve a single control plane too: they write its config
/// dir's applied.yaml, which it reads whole.
#[test]
fn apply_and_delete_write_a_config_dir_too() {
    let prefix = format!("mycel-t{:x}-dirapply", std::process::id());
    let w = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: { name: payment, labels: { app: payment } }\nspec: { node: n1, netns: /run/netns/payment, addresses: ['10.0.0.2'] }\n";
    let mut cp = ControlPlane::start(&prefix, &[("w.yaml", w)]).expect("mesh-cp");
    let dir = cp.config_dir.clone();
    let scratch = cp.data_dir.clone();
    let run = |verb: &str, file: &str, text: &str| {
        let path = scratch.join(file);
        std::fs::write(&path, text).expect("write");
        std::process::Command::new(mesh_tests::mesh::sibling_bin("mesh-cp", "MESH_CP_BIN"))
            .arg(verb)
            .arg("-f")
            .arg(&path)
            .arg("--config-dir")
            .arg(&dir)
            .output()
            .expect("mesh-cp")
    };
    let before = cp.version().expect("version");
    let out = run("apply", "deny.yaml", &deny_order("no-order", "Deny"));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("AccessPolicy default/no-order created"));
    let http = cp.http;
    cp.daemon()
        .wait_until(T, "the policy in force", || {
            let p = http_get(http, "/policies").ok()?;
            p.contains("no-order").then_some(())
        })
        .expect("applied");
    assert!(cp.version().expect("version") > before);
    // A workload taking payment's address: refused, nothing written.
    let clash = w
        .replace("name: payment,", "name: impostor,")
        .replace("/payment", "/impostor");
    let out = run("apply", "clash.yaml", &clash);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nothing was written"),
        "{err}"
    );
    // The hand-written file's objects are left to it.
    let out = run("apply", "w2.yaml", w);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("w.yaml"), "{err}");

    let out = run("delete", "deny.yaml", &deny_order("no-order", "Deny"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deleted"),
        "{out:?}"
    );
    cp.daemon()
        .wait_until(T, "the policy gone", || {
            let p = http_get(http, "/policies").ok()?;
            (!p.contains("no-order")).then_some(())
        })
        .expect("deleted");
}

/// etcd that serves TLS and asks for client certificates: a replica and `mesh-cp apply` reach
/// it with --etcd-ca, --etcd-cert and --etcd-key; without the client certificate apply fails
/// in one line and writes nothing.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let prefix = format!("mycel-t{:x}-etcdtls", std::process::id());
    let etcd = Etcd::start_tls(&prefix).expect("etcd over TLS");
    let ca = etcd::shared_ca(&prefix).expect("a CA");
    let mut cp =
        ControlPlane::start_etcd(&format!("{prefix}-a"), &etcd, &ca.files()).expect("replica");
    let (out, err) = cp
        .store_cmd("apply", "deny.yaml", &deny_order("no-order", "Deny"))
        .expect("apply over TLS");
    assert!(
        out.contains("AccessPolicy default/no-order created"),
        "{out}"
    );
    let version = written_version(&err);
    wait_everywhere(&mut [&mut cp], version, &[]);
    assert_eq!(cp.status().expect("/status")["store"]["reachable"], true);

    let tls = etcd.tls().expect("TLS files");
    let file = cp.data_dir.join("other.yaml");
    std::fs::write(&file, deny_order("other", "Deny")).expect("write");
    let out = std::process::Command::new(mesh_tests::mesh::sibling_bin("mesh-cp", "MESH_CP_BIN"))
        .arg("apply")
        .arg("-f")
        .arg(&file)
        .args(["--etcd-endpoints", &etcd.endpoint()])
        .arg("--etcd-ca")
        .arg(&tls.ca)
        .output()
        .expect("mesh-cp");
    let err = String::from_utf8_lossy(&out.stderr);
    println!("without a client certificate: {}", err.trim_end());
    assert!(!out.status.success(), "{err}");
    assert!(
        err.starts_with("mesh-cp: error: etcd at https://127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("--etcd-cert"),
        "says what is likely missing: {err}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cp.version().expect("version"),
        version,
        "nothing was written"
    );
    drop((cp, etcd, ca));
}
