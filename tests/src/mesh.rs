//! A mesh-node daemon running against a [`Topology`](crate::Topology) node.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    cp::ControlPlane,
    daemon::Daemon,
    topology::{Node, Pod, Topology},
};

/// The mesh-node binary next to the running test or xtask binary, or `$MESH_NODE_BIN`.
pub fn mesh_node_bin() -> PathBuf {
    sibling_bin("mesh-node", "MESH_NODE_BIN")
}

/// A workspace binary next to the running test or xtask binary (`target/<profile>/`), or the
/// path in `$env_override`.
pub fn sibling_bin(name: &str, env_override: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_override) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A free loopback port for a daemon to listen on.
///
/// Taken below the kernel's ephemeral range (32768 and up here), so that no outgoing
/// connection can take it between this check and the daemon's bind, which happened with
/// ephemeral ports once daemons had several listeners each; handed out once per process
/// (a cursor), starting at an offset of the process id so that concurrent test processes
/// rarely meet; and checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = u16::try_from(FIRST + i).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// `Workload` documents for `pods`, each placed on its own node, with its addresses, the label
/// `app: <pod name>` and the service account `<pod name>`.
pub fn workloads_yaml(pods: &[&Pod]) -> String {
    pods.iter()
        .map(|p| workload_yaml(p, &p.name))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The `Workload` document of `pod` on its node, with its addresses, the label `app: <app>`
/// and the service account `<pod name>`.
pub fn workload_yaml(pod: &Pod, app: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: default, labels: {{ app: {app} }} }}\nspec: {{ node: {node}, netns: {netns}, addresses: ['{v4}', '{v6}'], serviceAccount: {name} }}\n",
        name = pod.name,
        node = pod.node,
        netns = pod.netns_path().display(),
        v4 = pod.ipv4,
        v6 = pod.ipv6,
    )
}

/// A `Service` document: `vip:port` goes to `target_port` of the workloads labelled
/// `app: <app>`.
pub fn service_yaml(name: &str, vip: &str, port: u16, target_port: u16, app: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec: {{ vips: ['{vip}'], ports: [{{ name: main, port: {port}, targetPort: {target_port} }}], selector: {{ app: {app} }} }}\n"
    )
}

/// The `MeshConfig` document with `transport` and `spec`'s other fields (`a: b, c: d`, or
/// nothing).
pub fn mesh_config_yaml(transport: &str, spec: &str) -> String {
    let sep = if spec.is_empty() { "" } else { ", " };
    let hop = match local_hop() {
        Some(hop) if !spec.contains("localHop") => format!(", localHop: {hop}"),
        _ => String::new(),
    };
    format!("apiVersion: mycel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec: {{ transport: {transport}{sep}{spec}{hop} }}\n")
}

thread_local! {
    /// The `localHop` this test thread's meshes use (see [`with_local_hop`]).
    static LOCAL_HOP: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `test` with every MeshConfig that [`mesh_config_yaml`] writes on this thread (and
/// every offline workloads file [`MeshNode`] writes) set to `localHop: hop`, unless a test
/// names its own. Each test runs on its own thread, so tests running at once do not mix.
pub fn with_local_hop<T>(hop: &'static str, test: impl FnOnce() -> T) -> T {
    LOCAL_HOP.with(|h| h.set(Some(hop)));
    test()
}

/// The `localHop` set by [`with_local_hop`] on this thread.
pub fn local_hop() -> Option<&'static str> {
    LOCAL_HOP.with(|h| h.get())
}

/// An offline-mode workloads file `text` with a MeshConfig that sets the `localHop` of
/// [`with_local_hop`], unless it has a MeshConfig of its own or no hop is set.
fn with_offline_mesh_config(text: &str) -> String {
    match local_hop() {
        Some(hop) if !text.contains("kind: MeshConfig") => format!("{text}\n---\napiVersion: mycel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec: {{ localHop: {hop} }}\n"),
        _ => text.to_owned(),
    }
}

/// What a mesh-node in Kubernetes mode is given.
pub struct KubeNode {
    pub kubeconfig: PathBuf,
    pub token_file: PathBuf,
    pub cp_ca: PathBuf,
    pub cni_socket: PathBuf,
}

pub struct MeshNode {
    daemon: Daemon,
    /// A cgroup made for the daemon alone (when the caller named none), removed on drop.
    own_cgroup: Option<PathBuf>,
    pub admin: SocketAddr,
    /// The Prometheus endpoint (`/metrics`), on loopback.
    pub metrics: SocketAddr,
    /// Offline mode's workloads file (unused when the node follows a control plane).
    pub workloads_file: PathBuf,
    pub log_file: PathBuf,
}

impl MeshNode {
    /// Starts mesh-node in offline mode for `node`, attached to the node's cgroup, with the
    /// daemon process itself in `daemon_cgroup` (or, when `None`, in a cgroup of its own made
    /// next to the topology's: mesh-node refuses to share one).
    pub fn start(
        node: &Node,
        workloads: &str,
        daemon_cgroup: Option<&Path>,
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::launch(node, daemon_cgroup, extra, &[], |workloads_file| {
            fs::write(workloads_file, with_offline_mesh_config(workloads))?;
            Ok(vec!["--workloads".into(), workloads_file.into()])
        })
    }

    /// Starts mesh-node on `node` following `cp`, the daemon in its own cgroup below the node's,
    /// and waits until it has enrolled `workloads` workloads with a certificate each.
    pub fn join(
        topo: &mut Topology,
        node: &str,
        cp: &ControlPlane,
        workloads: u64,
    ) -> io::Result<Self> {
        Self::join_with(topo, node, cp, workloads, &[])
    }

    /// [`MeshNode::join`] with more mesh-node arguments.
    pub fn join_with(
        topo: &mut Topology,
        node: &str,
        cp: &ControlPlane,
        workloads: u64,
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::join_via(topo, node, cp, cp.grpc, workloads, extra)
    }

    /// [`MeshNode::join_with`], reaching the control plane at `cp_addr` (a relay in front
    /// of it).
    pub fn join_via(
        topo: &mut Topology,
        node: &str,
        cp: &ControlPlane,
        cp_addr: SocketAddr,
        workloads: u64,
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::join_any(topo, node, cp, &[cp_addr], workloads, extra)
    }

    /// [`MeshNode::join_via`] with several control-plane addresses, `--cp A,B`.
    pub fn join_any(
        topo: &mut Topology,
        node: &str,
        cp: &ControlPlane,
        cp_addrs: &[SocketAddr],
        workloads: u64,
        extra: &[&str],
    ) -> io::Result<Self> {
        // A node joined again (a restarted daemon) gets a new cgroup next to the old one.
        let parent = topo.node(node).cgroup.clone();
        let name = (1..)
            .map(|i| match i {
                1 => "mesh-node".to_owned(),
                i => format!("mesh-node-{i}"),
            })
            .find(|name| !parent.join(name).exists())
            .unwrap_or_default();
        let cg = topo
            .add_cgroup_below(&parent, &name)
            .map_err(io::Error::other)?;
        let mut daemon = Self::connect_to_any(topo.node(node), cp, cp_addrs, Some(&cg), extra)?;
        daemon.wait_for(Duration::from_secs(30), |s| {
            s["enrolled_workloads"] == workloads
                && s["svids"] == workloads
                && s["cp_connected"] == 1
        })?;
        Ok(daemon)
    }

    /// Starts mesh-node for `node` following the control plane `cp`, with a fresh join token.
    pub fn connect(
        node: &Node,
        cp: &ControlPlane,
        daemon_cgroup: Option<&Path>,
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::connect_to(node, cp, cp.grpc, daemon_cgroup, extra)
    }

    pub fn connect_to(
        node: &Node,
        cp: &ControlPlane,
        cp_addr: SocketAddr,
        daemon_cgroup: Option<&Path>,
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::connect_to_any(node, cp, &[cp_addr], daemon_cgroup, extra)
    }

    /// [`MeshNode::connect_to`] with several control-plane addresses (replicas of `cp`'s
    /// store), `--cp A,B`.
    pub fn connect_to_any(
        node: &Node,
        cp: &ControlPlane,
        cp_addrs: &[SocketAddr],
        daemon_cgroup: Option<&Path>,
        extra: &[&str],
    ) -> io::Result<Self> {
        let token_file = cp.token_file(&node.name)?;
        let addrs: Vec<String> = cp_addrs.iter().map(SocketAddr::to_string).collect();
        Self::launch(node, daemon_cgroup, extra, &[], |_| {
            Ok(vec![
                "--cp".into(),
                addrs.join(",").into(),
                "--token-file".into(),
                token_file.into(),
                "--cp-ca".into(),
                cp.ca_cert().into(),
            ])
        })
    }

    /// Starts `mesh-node run --kubernetes` on `node`: pods to capture from the API server of
    /// `kubeconfig` and the CNI plugin on `cni_socket`, identities and policy from `cp` (whose
    /// root is `cp_ca`, read from the trust-bundle ConfigMap), authenticated by the
    /// service-account token in `token_file`. The daemon runs in its own cgroup below the
    /// node's.
    pub fn kubernetes(
        topo: &mut Topology,
        node: &str,
        cp: &ControlPlane,
        kube: &KubeNode,
        extra: &[&str],
    ) -> io::Result<Self> {
        let parent = topo.node(node).cgroup.clone();
        let cg = topo
            .add_cgroup_below(&parent, "mesh-node")
            .map_err(io::Error::other)?;
        let env = [("KUBECONFIG", kube.kubeconfig.as_path())];
        Self::launch(topo.node(node), Some(&cg), extra, &env, |_| {
            Ok(vec![
                "--kubernetes".into(),
                "--cp".into(),
                cp.grpc.to_string().into(),
                "--token-file".into(),
                kube.token_file.clone().into(),
                "--cp-ca".into(),
                kube.cp_ca.clone().into(),
                "--cni-socket".into(),
                kube.cni_socket.clone().into(),
            ])
        })
    }

    fn launch(
        node: &Node,
        daemon_cgroup: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &Path)],
        source: impl FnOnce(&Path) -> io::Result<Vec<std::ffi::OsString>>,
    ) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-mesh-node-{}", node.netns, free_port()));
        fs::create_dir_all(&dir)?;
        let workloads_file = dir.join("workloads.yaml");
        let source_args = source(&workloads_file)?;
        let log_file = dir.join("mesh-node.log");
        // mesh-node refuses a cgroup with other processes in it (they would escape capture).
        let own_cgroup = match daemon_cgroup {
            Some(_) => None,
            None => {
                let root = crate::topology::cgroup2_mount().map_err(io::Error::other)?;
                let cg = root.join(format!("{}-mesh-node-{}", node.netns, free_port()));
                fs::create_dir(&cg)?;
                Some(cg)
            }
        };
        let daemon_cgroup = daemon_cgroup.or(own_cgroup.as_deref());
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(mesh_node_bin());
        cmd.arg("run")
            .arg("--node-name")
            .arg(&node.name)
            .args(source_args)
            .arg("--cgroup")
            .arg(&node.cgroup)
            .arg("--bpffs")
            .arg(&node.bpffs)
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--reload-interval")
            .arg("0.1")
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("MESH_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("stdout"))?)
            .stderr(fs::File::create(&log_file)?);
        let child = crate::topology::spawn_in(None, daemon_cgroup, &mut cmd);
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &own_cgroup {
                    let _ = fs::remove_dir(cg);
                }
                return Err(e);
            }
        };
        Ok(Self {
            daemon: Daemon::new("mesh-node", child, dir, log_file.clone()),
            own_cgroup,
            admin,
            metrics,
            workloads_file,
            log_file,
        })
    }

    /// Waits until the admin endpoint reports `enrolled` workloads.
    pub fn wait_enrolled(&mut self, enrolled: u64) -> io::Result<()> {
        self.wait_for(Duration::from_secs(20), |s| {
            s.get("enrolled_workloads") == Some(&enrolled)
        })
    }

    /// Polls the node's figures ([`MeshNode::stats`]) until `cond` holds, failing with the
    /// daemon's log if it exits or times out.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        cond: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> io::Result<()> {
        let metrics = self.metrics;
        self.daemon
            .wait_until(timeout, "stats condition", || {
                let stats = stats_of(metrics).ok()?;
                cond(&stats).then_some(())
            })
            .map_err(|e| io::Error::new(e.kind(), format!("{e}\nstats: {:?}", self.stats().ok())))
    }

    /// The node's figures by the names the tests use, read from `/metrics` (see [`FIGURES`]).
    pub fn stats(&self) -> io::Result<BTreeMap<String, u64>> {
        stats_of(self.metrics)
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.stats()
            .unwrap_or_else(|e| panic!("cannot read mesh-node stats: {e}\n{}", self.log()))
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no stat {name}"))
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Checks that connections crossed the pod-local hop the way this test thread's
    /// [`with_local_hop`] says: some socket to socket with `sockmap`, none with `tcp` (the
    /// sockets do not even join the map).
    pub fn assert_local_hop(&self) {
        let (direct, tcp) = (self.stat("ebpf_hop_direct"), self.stat("ebpf_hop_tcp"));
        match local_hop() {
            Some("sockmap") => assert!(
                direct > 0,
                "no hop went socket to socket (hop_tcp={tcp}, hop_full={})",
                self.stat("ebpf_hop_full")
            ),
            Some(_) => assert_eq!(
                (direct, tcp),
                (0, 0),
                "hop sockets joined the map with localHop: tcp"
            ),
            None => {}
        }
    }

    /// `GET /debug/certs`: the serial of each certificate held, by SPIFFE ID.
    pub fn cert_serials(&self) -> io::Result<BTreeMap<String, String>> {
        let body: serde_json::Value = serde_json::from_str(&http_get(self.admin, "/debug/certs")?)
            .map_err(io::Error::other)?;
        Ok(body["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["identity"].as_str()?.to_string(),
                    c["serial"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// `GET path` on the admin endpoint: the status code and body, whatever the status.
    pub fn admin_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get_any(self.admin, path)
    }

    /// Waits until the log contains `needle`; returns the whole log.
    pub fn wait_log(&mut self, timeout: Duration, needle: &str) -> io::Result<String> {
        let file = self.log_file.clone();
        self.daemon.wait_until(timeout, needle, || {
            let log = fs::read_to_string(&file).ok()?;
            log.contains(needle).then_some(log)
        })
    }

    /// The access log's lines so far (the daemon's standard output), parsed.
    pub fn access_log(&self) -> io::Result<Vec<serde_json::Value>> {
        fs::read_to_string(self.daemon.dir.join("stdout"))?
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| io::Error::other(format!("{e}: {l}"))))
            .collect()
    }

    /// `GET /metrics`: the Prometheus exposition.
    pub fn metrics_text(&self) -> io::Result<String> {
        http_get(self.metrics, "/metrics")
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// Replaces the workloads file (atomically, by rename).
    pub fn write_workloads(&self, text: &str) -> io::Result<()> {
        let tmp = self.daemon.dir.join("workloads.yaml.tmp");
        fs::write(&tmp, with_offline_mesh_config(text))?;
        fs::rename(tmp, &self.workloads_file)
    }

    /// Sends `signal` and waits for the exit status (killing after 15 s).
    pub fn stop_with(&mut self, signal: i32) -> io::Result<std::process::ExitStatus> {
        self.daemon.stop_with(signal)
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        let Some(cg) = self.own_cgroup.take() else {
            return;
        };
        if !self.daemon.is_stopped() {
            let _ = self.daemon.stop_with(libc::SIGTERM);
        }
        // The cgroup empties as the process is reaped; a moment later it can go.
        for _ in 0..100 {
            if fs::remove_dir(&cg).is_ok() || !cg.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A figure the tests read, and the series of `/metrics` it sums.
struct Figure {
    name: &'static str,
    /// Summed: each a metric and the labels its samples must have.
    sums: &'static [(&'static str, &'static [(&'static str, &'static str)])],
}

const fn figure(
    name: &'static str,
    sums: &'static [(&'static str, &'static [(&'static str, &'static str)])],
) -> Figure {
    Figure { name, sums }
}

const CONNECT: &str = "mycel_tcp_connect_duration_seconds_count";
const FAILED: &str = "mycel_tcp_connections_failed_total";
const TUNNELS: &str = "mycel_tunnels_total";

/// The figures the tests read by name. Every one is a sum of series of the node's
/// Prometheus exposition: the node has no other counters.
const FIGURES: &[Figure] = &[
    figure("enrolled_workloads", &[("mycel_enrolled_workloads", &[])]),
    figure(
        "without_client_address",
        &[("mycel_enrolled_without_client_address", &[])],
    ),
    figure(
        "delivered_from_own_address",
        &[("mycel_delivered_from_own_address_total", &[])],
    ),
    figure("cp_connected", &[("mycel_control_plane_connected", &[])]),
    figure(
        "config_errors",
        &[("mycel_config_applies_total", &[("result", "error")])],
    ),
    figure(
        "fast_deny_entries",
        &[("mycel_ebpf_map_entries", &[("map", "fast_deny")])],
    ),
    figure(
        "orig_dst_entries_by_cookie",
        &[("mycel_ebpf_map_entries", &[("map", "orig_dst_by_cookie")])],
    ),
    figure(
        "orig_dst_entries_by_tuple",
        &[("mycel_ebpf_map_entries", &[("map", "orig_dst_by_tuple")])],
    ),
    // Outbound connections sent on: each one's connect is timed, whatever the transport.
    figure("proxy_forwarded", &[(CONNECT, &[])]),
    figure("proxy_same_node", &[(CONNECT, &[("transport", "local")])]),
    figure(
        "proxy_passthrough",
        &[(CONNECT, &[("transport", "passthrough")])],
    ),
    figure("tunnels_quic", &[(CONNECT, &[("transport", "quic")])]),
    // Outbound connections that left a trace at the source: connected, or failed there (one
    // that failed after it connected counts twice). The tests compare it before and after an
    // action, to see that the proxy took nothing on.
    figure(
        "proxy_accepted",
        &[(CONNECT, &[]), (FAILED, &[("reporter", "source")])],
    ),
    // Connects to an application or a passthrough destination that failed, at either end;
    // a source also counts a destination's refusal because its application did not answer.
    figure(
        "proxy_upstream_failed",
        &[(FAILED, &[("reason", "upstream_connect")])],
    ),
    figure(
        "proxy_no_orig_dst",
        &[(FAILED, &[("reason", "no_original_destination")])],
    ),
    // On demand: refused because the control plane did not say in time who an address is.
    figure("unresolved", &[(FAILED, &[("reason", "unresolved")])]),
    // Refused by a policy, at either end.
    figure("denied", &[(FAILED, &[("reason", "denied")])]),
    // Bytes from destinations to this node's applications, as their source proxies count them.
    figure(
        "proxy_bytes_received",
        &[("mycel_tcp_received_bytes_total", &[("reporter", "source")])],
    ),
    figure(
        "policy_closed_open_connections",
        &[("mycel_policy_closed_connections_total", &[])],
    ),
    // Connections admitted at this node's destinations and open.
    figure(
        "policy_open_connections",
        &[("mycel_tcp_connections_open", &[("reporter", "destination")])],
    ),
    figure(
        "tunnels_out",
        &[(TUNNELS, &[("direction", "out"), ("outcome", "opened")])],
    ),
    figure(
        "tunnels_reused",
        &[(TUNNELS, &[("direction", "out"), ("outcome", "reused")])],
    ),
    figure(
        "tunnels_in",
        &[(TUNNELS, &[("direction", "in"), ("outcome", "accepted")])],
    ),
    figure(
        "tunnels_in_refused",
        &[(TUNNELS, &[("direction", "in"), ("outcome", "refused")])],
    ),
    figure(
        "quic_connections_out",
        &[(TUNNELS, &[("direction", "quic_out")])],
    ),
    figure(
        "quic_connections_in",
        &[(TUNNELS, &[("direction", "quic_in")])],
    ),
    figure(
        "plaintext_in",
        &[("mycel_plaintext_connections_total", &[])],
    ),
    figure(
        "plaintext_denied",
        &[(
            "mycel_plaintext_connections_total",
            &[("outcome", "denied")],
        )],
    ),
    figure("inbound_open", &[("mycel_inbound_connections_open", &[])]),
    figure("inbound_handshakes", &[("mycel_inbound_handshakes", &[])]),
];

fn stats_of(metrics: SocketAddr) -> io::Result<BTreeMap<String, u64>> {
    let text = http_get(metrics, "/metrics")?;
    let exposition = crate::prom::Exposition::parse(&text).map_err(io::Error::other)?;
    // Counters and gauges of whole numbers: the casts lose nothing.
    let sum = |name: &str, want: &[(&str, &str)]| exposition.sum(name, want) as u64;
    let mut out: BTreeMap<String, u64> = FIGURES
        .iter()
        .map(|f| {
            let total = f.sums.iter().map(|(name, want)| sum(name, want)).sum();
            (f.name.to_owned(), total)
        })
        .collect();
    // Every eBPF counter by its own name, `ebpf_<event>`.
    for (labels, value) in exposition.matching("mycel_ebpf_events_total", &[]) {
        if let Some(event) = labels.get("event") {
            out.insert(format!("ebpf_{event}"), value as u64);
        }
    }
    // Each decision counter as `policy_decisions{policy="…",rule="…",action="…",mode="…"}`.
    for (labels, value) in exposition.matching("mycel_policy_decisions_total", &[]) {
        let label = |k: &str| labels.get(k).map_or("", String::as_str);
        let key = format!(
            "policy_decisions{{policy=\"{}\",rule=\"{}\",action=\"{}\",mode=\"{}\"}}",
            label("policy"),
            label("rule"),
            label("action"),
            label("mode")
        );
        out.insert(key, value as u64);
    }
    let certificates = exposition
        .matching("mycel_certificate_expiry_timestamp_seconds", &[])
        .count();
    out.insert("svids".into(), certificates as u64);
    Ok(out)
}

/// Runs `cmd` to its end in a cgroup of its own, named for `node` (mesh-node refuses a
/// cgroup it shares), and removes the cgroup after.
pub fn run_alone(node: &Node, cmd: &mut Command) -> io::Result<std::process::Output> {
    let root = crate::topology::cgroup2_mount().map_err(io::Error::other)?;
    let cg = root.join(format!("{}-once-{}", node.netns, free_port()));
    fs::create_dir(&cg)?;
    let out = crate::topology::spawn_in(
        None,
        Some(&cg),
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()),
    )
    .and_then(|c| c.wait_with_output());
    for _ in 0..100 {
        if fs::remove_dir(&cg).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

/// A minimal HTTP/1.1 GET (loopback only): status code and body.
pub fn http_get_any(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("bad response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
    Ok((code, body.to_string()))
}

/// A minimal HTTP/1.1 GET against the admin endpoint (loopback only); anything but 200 is an
/// error.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    match http_get_any(addr, path)? {
        (200, body) => Ok(body),
        (code, body) => Err(io::Error::other(format!("{path}: {code} {}", body.trim()))),
    }
}
