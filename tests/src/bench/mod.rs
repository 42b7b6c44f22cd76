//! `cargo xtask bench`: what the mesh costs, as ratios against baselines measured in the same
//! run. The machines are shared and noisy, so every pair of setups is run interleaved (A B A B
//! …) and reported as medians with their spread; nothing here asserts a time.
//!
//! One topology holds every setup: a client and a server outside the mesh (direct, and
//! end-to-end rustls between the two applications), and a mesh client calling a mesh server on
//! the other node (Mycel TLS) and on its own node (Mycel same-node). Besides the traffic
//! figures it measures the node daemons' CPU per GB moved against the AES-GCM floor, their
//! memory per idle tunnelled connection, and the time from a policy change to both nodes
//! enforcing it; and draws the ratios as an SVG chart. `http.rs` adds the request figures of
//! ports that declare HTTP.

mod http;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};

use crate::{
    app::Server,
    mesh::{mesh_config_yaml, service_yaml, sibling_bin, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 9000;
const TLS_PORT: u16 = 9001;
/// A Service for s1, so that one setup goes through the service path: a backend, its traffic
/// settings, limits and the endpoint order, as every connection to a VIP does.
const VIP: &str = "10.96.0.90";

pub struct Options {
    /// Topology name prefix (tests use the test prefix so leftovers are found and removed).
    pub prefix: String,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Interleaved rounds per metric.
    pub rounds: usize,
    /// Requests per second of the latency test.
    pub rpc_rate: u32,
    /// Idle tunnelled connections for the memory figure.
    pub idle_connections: usize,
    /// Policy changes timed.
    pub policy_changes: usize,
    /// Bytes for the crypto floor.
    pub crypto_bytes: usize,
    /// Where the JSON report and chart go.
    pub out_dir: PathBuf,
    /// Measure only this figure (`bulk-1`, `bulk-4`, `rpc`, `connrate`, `http-1.1`,
    /// `http-h2`, `idle`, `policy`).
    pub only: Option<String>,
    /// Record a `perf` profile of both node daemons during each Mycel run (TLS and QUIC) and
    /// write its top symbols next to the report (`profile-<metric>-<setup>-<round>.txt`); for
    /// `rpc`, the machine's scheduler delays instead (`perf sched latency`), direct included.
    pub profile: bool,
    /// Whether bulk transfer is measured through the socket map too (last, after every other
    /// figure). Off in a quick run: it may fill the node's TCP memory (no backpressure there),
    /// and a quick run shares the machine with the test suite.
    pub sockmap_bulk: bool,
}

impl Options {
    pub fn full(prefix: &str, out_dir: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            seconds: 3.0,
            rounds: 3,
            rpc_rate: 1000,
            idle_connections: 1000,
            policy_changes: 5,
            crypto_bytes: 1 << 30,
            out_dir,
            only: None,
            profile: false,
            sockmap_bulk: true,
        }
    }

    /// A short run that exercises every path of the harness.
    pub fn quick(prefix: &str, out_dir: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            seconds: 0.5,
            rounds: 1,
            rpc_rate: 200,
            idle_connections: 50,
            policy_changes: 2,
            crypto_bytes: 16 << 20,
            out_dir,
            only: None,
            profile: false,
            sockmap_bulk: false,
        }
    }
}

/// One way for a client to reach a server.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub name: &'static str,
    client: &'static str,
    server: &'static str,
    port: u16,
    tls: bool,
    /// The mesh's transport this setup needs (set in its MeshConfig before it runs).
    transport: Option<&'static str>,
    /// The mesh's `localHop` for a mesh setup: `sockmap` or `tcp`.
    local_hop: &'static str,
    /// To the server's Service VIP rather than its pod address.
    vip: bool,
}

impl Setup {
    /// Whether its idle memory is measured: once per transport.
    fn idle(&self) -> bool {
        self.transport.is_some() && !self.vip && self.local_hop == "tcp" && self.server != "s2"
    }
}

/// In the order they are interleaved; the first is the baseline for ratios.
pub const SETUPS: [Setup; 9] = [
    Setup {
        name: "direct",
        client: "c0",
        server: "s0",
        port: PORT,
        tls: false,
        transport: None,
        local_hop: "tcp",
        vip: false,
    },
    Setup {
        name: "rustls",
        client: "c0",
        server: "s0",
        port: TLS_PORT,
        tls: true,
        transport: None,
        local_hop: "tcp",
        vip: false,
    },
    Setup {
        name: "mycel-tls",
        client: "c1",
        server: "s1",
        port: PORT,
        tls: false,
        transport: Some("tls"),
        local_hop: "tcp",
        vip: false,
    },
    Setup {
        name: "mycel-quic",
        client: "c1",
        server: "s1",
        port: PORT,
        tls: false,
        transport: Some("quic"),
        local_hop: "tcp",
        vip: false,
    },
    Setup {
        name: "mycel-tls-vip",
        client: "c1",
        server: "s1",
        port: PORT,
        tls: false,
        transport: Some("tls"),
        local_hop: "tcp",
        vip: true,
    },
    Setup {
        name: "mycel-same-node",
        client: "c1",
        server: "s2",
        port: PORT,
        tls: false,
        transport: Some("tls"),
        local_hop: "tcp",
        vip: false,
    },
    // The same with the pod-local hop through the socket map (`localHop: sockmap`,
    // experimental), in the same run.
    Setup {
        name: "mycel-tls-sockmap",
        client: "c1",
        server: "s1",
        port: PORT,
        tls: false,
        transport: Some("tls"),
        local_hop: "sockmap",
        vip: false,
    },
    Setup {
        name: "mycel-quic-sockmap",
        client: "c1",
        server: "s1",
        port: PORT,
        tls: false,
        transport: Some("quic"),
        local_hop: "sockmap",
        vip: false,
    },
    Setup {
        name: "mycel-same-node-sockmap",
        client: "c1",
        server: "s2",
        port: PORT,
        tls: false,
        transport: Some("tls"),
        local_hop: "sockmap",
        vip: false,
    },
];

/// Whether a run failed the way an application through the socket map can: its send got
/// `ENOMEM` (no backpressure), or a blocking call `EAGAIN` (the kernel's wait gave up
/// without data).
fn sockmap_refused(e: &io::Error) -> bool {
    let e = e.to_string();
    e.contains("Cannot allocate memory") || e.contains("Resource temporarily unavailable")
}

/// The mesh's transport and `localHop`.
type MeshSettings = (&'static str, &'static str);

/// Sets the mesh's transport and local hop, if they are not `current` already, and waits for
/// both nodes.
fn use_mesh(
    cp: &mut ControlPlane,
    current: &mut MeshSettings,
    wanted: MeshSettings,
) -> io::Result<()> {
    if *current != wanted {
        let spec = format!("localHop: {}", wanted.1);
        cp.apply(
            "mesh.yaml",
            &mesh_config_yaml(wanted.0, &spec),
            &["n1", "n2"],
        )?;
        *current = wanted;
    }
    Ok(())
}

/// A measured quantity: the loadgen mode and arguments, and which JSON fields it reports.
struct Metric {
    name: &'static str,
    mode: &'static str,
    extra: Vec<String>,
    fields: &'static [&'static str],
}

fn metrics(o: &Options) -> Vec<Metric> {
    vec![
        Metric {
            name: "bulk-1",
            mode: "bulk",
            extra: vec!["--streams".into(), "1".into()],
            fields: &["bytes_per_second"],
        },
        Metric {
            name: "bulk-4",
            mode: "bulk",
            extra: vec!["--streams".into(), "4".into()],
            fields: &["bytes_per_second"],
        },
        Metric {
            name: "rpc",
            mode: "rpc",
            extra: vec!["--rate".into(), o.rpc_rate.to_string()],
            fields: &["p50_us", "p99_us", "p999_us"],
        },
        Metric {
            name: "connrate",
            mode: "connrate",
            extra: vec!["--concurrency".into(), "4".into()],
            fields: &["per_second"],
        },
    ]
}

/// Samples by `metric.field` then setup name.
pub type Samples = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

pub struct Report {
    pub samples: Samples,
    pub json: Value,
    pub table: String,
    pub file: PathBuf,
}

fn loadgen() -> PathBuf {
    sibling_bin("mesh-loadgen", "MESH_LOADGEN_BIN")
}

fn start_server(topo: &Topology, pod: &str, port: u16, tls: Option<&Path>) -> io::Result<Server> {
    let mut cmd = Command::new(loadgen());
    cmd.args(["serve", "--port", &port.to_string()]);
    if let Some(dir) = tls {
        cmd.arg("--tls").arg(dir);
    }
    Server::spawn(topo.pod(pod), &mut cmd)
}

/// Runs the benchmark and writes its JSON report into `o.out_dir`.
pub fn run(o: &Options) -> io::Result<Report> {
    let mut topo = Topology::with_prefix(
        &o.prefix,
        &[
            NodeSpec::new("n1", &["c0", "c1", "s2"]),
            NodeSpec::new("n2", &["s0", "s1"]),
        ],
    )
    .map_err(io::Error::other)?;
    let tls_dir = std::env::temp_dir().join(format!("{}-bench-tls", topo.prefix));
    let result = measure(o, &mut topo, &tls_dir);
    let _ = std::fs::remove_dir_all(&tls_dir);
    result
}

fn measure(o: &Options, topo: &mut Topology, tls_dir: &Path) -> io::Result<Report> {
    let _servers = [
        start_server(topo, "s0", PORT, None)?,
        start_server(topo, "s0", TLS_PORT, Some(tls_dir))?,
        start_server(topo, "s1", PORT, None)?,
        start_server(topo, "s2", PORT, None)?,
    ];
    let _http_servers = http::start_servers(topo)?;
    let pods = ["c1", "s1", "s2"].map(|p| topo.pod(p));
    let mut settings: MeshSettings = ("tls", "tcp");
    let mut cp = ControlPlane::start(
        &format!("{}-bench", topo.prefix),
        &[
            ("workloads.yaml", &workloads_yaml(&pods)),
            ("service.yaml", &service_yaml("s1", VIP, PORT, PORT, "s1")),
            ("http-service.yaml", &http::service_yaml()),
            (
                "mesh.yaml",
                &mesh_config_yaml(settings.0, &format!("localHop: {}", settings.1)),
            ),
        ],
    )?;
    // The machine's two cores serve two nodes and their applications: one core per node,
    // as the targets are set (a second thread per daemon would only wake the first).
    let join = |topo: &mut Topology, cp: &ControlPlane| -> io::Result<[MeshNode; 2]> {
        Ok([
            MeshNode::join_with(topo, "n1", cp, 2, &WORKERS)?,
            MeshNode::join_with(topo, "n2", cp, 1, &WORKERS)?,
        ])
    };
    let pids =
        |nodes: &[MeshNode; 2]| -> Vec<u32> { nodes.iter().filter_map(MeshNode::pid).collect() };
    let mut nodes = join(topo, &cp)?;
    let wanted = |name: &str| o.only.as_deref().is_none_or(|only| only == name);
    // Idle memory first, on daemons started afresh under each transport: memory that earlier
    // runs freed but the allocator kept would otherwise hide what idle connections cost.
    let mut idle = Vec::new();
    if wanted("idle") {
        // One measurement per transport: the VIP setup's daemons are the same.
        for setup in SETUPS.iter().filter(|s| s.idle()) {
            let Some(t) = setup.transport else {
                continue;
            };
            use_mesh(&mut cp, &mut settings, (t, setup.local_hop))?;
            drop(nodes);
            nodes = join(topo, &cp)?;
            idle.push((setup.name, idle_memory(o, topo, &pids(&nodes))?));
        }
    }
    let daemons = pids(&nodes);

    let mut samples = Samples::new();
    // Runs of the experimental socket-map hop that failed as the kernel fails applications
    // there (ENOMEM for a sender that outruns its peer, with no backpressure; EAGAIN from a
    // blocking call): a finding, not a harness fault. Metric, setup, error.
    let mut failed: Vec<(String, String, String)> = Vec::new();
    let mut put = |key: String, setup: &str, v: f64| {
        samples
            .entry(key)
            .or_default()
            .entry(setup.to_owned())
            .or_default()
            .push(v)
    };
    for (name, mb) in idle {
        put("idle-1000.rss_mb".into(), name, mb);
    }
    // Bulk through the socket map goes last, after every other figure: with no backpressure
    // there, a sender that outruns the proxy fills the node's TCP memory, and whatever ran
    // after it would measure the kernel's memory pressure.
    let all = metrics(o);
    let (mut deferred, mut plan) = (Vec::new(), Vec::new());
    for metric in all.iter().filter(|m| wanted(m.name)) {
        for round in 0..o.rounds {
            for setup in SETUPS {
                if metric.mode == "bulk" && setup.local_hop == "sockmap" {
                    if o.sockmap_bulk {
                        deferred.push((metric, round, setup));
                    }
                } else {
                    plan.push((metric, round, setup));
                }
            }
        }
    }
    let run = Run {
        o,
        topo,
        tls_dir,
        daemons: &daemons,
        source: &nodes[0],
    };
    run.each(&plan, &mut cp, &mut settings, &mut put, &mut failed)?;
    let http: Vec<&str> = http::NAMES.into_iter().filter(|n| wanted(n)).collect();
    if !http.is_empty() {
        let profile = o.profile.then_some(o.out_dir.as_path());
        // Each HTTP setup once per local hop; the socket map's under `<setup>-sockmap`.
        for hop in ["tcp", "sockmap"] {
            use_mesh(&mut cp, &mut settings, ("tls", hop))?;
            let mut put_hop = |key: String, setup: &str, v: f64| match hop {
                "sockmap" => put(key, &format!("{setup}-sockmap"), v),
                _ => put(key, setup, v),
            };
            let measured = http::measure(
                topo,
                &daemons,
                &http,
                (o.seconds, o.rounds),
                profile,
                &mut put_hop,
            );
            match measured {
                Ok(()) => {}
                Err(e) if hop == "sockmap" && sockmap_refused(&e) => {
                    failed.push((http.join(","), "mycel-http-sockmap".into(), e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
    }
    if wanted("bulk-1") {
        put(
            "crypto-floor.cpu_s_per_gb".into(),
            "aes-256-gcm",
            crypto_floor(o.crypto_bytes),
        );
    }
    if wanted("policy") {
        for seconds in policy_changes(o, &mut cp)? {
            put("policy-change.seconds".into(), "mycel-tls", seconds);
        }
    }
    run.each(&deferred, &mut cp, &mut settings, &mut put, &mut failed)?;
    report(o, samples, &failed)
}

/// What every measured run needs.
struct Run<'a> {
    o: &'a Options,
    topo: &'a Topology,
    tls_dir: &'a Path,
    daemons: &'a [u32],
    /// The node of the clients' pods, whose metrics time each connection's setup.
    source: &'a MeshNode,
}

impl Run<'_> {
    /// The runs of `plan` in order, each with the mesh set for its setup first.
    fn each(
        &self,
        plan: &[(&Metric, usize, Setup)],
        cp: &mut ControlPlane,
        settings: &mut MeshSettings,
        put: &mut dyn FnMut(String, &str, f64),
        failed: &mut Vec<(String, String, String)>,
    ) -> io::Result<()> {
        for &(metric, round, setup) in plan {
            if let Some(wanted) = setup.transport {
                use_mesh(cp, settings, (wanted, setup.local_hop))?;
            }
            self.once(metric, setup, round, put, failed)?;
        }
        Ok(())
    }

    /// One run of `metric` on `setup` (the mesh already set for it): its figures go to `put`;
    /// a socket-map run that failed as the kernel fails applications there goes to `failed`.
    fn once(
        &self,
        metric: &Metric,
        setup: Setup,
        round: usize,
        put: &mut dyn FnMut(String, &str, f64),
        failed: &mut Vec<(String, String, String)>,
    ) -> io::Result<()> {
        // Latency is lost waiting to be scheduled rather than computing, so the
        // latency figure records scheduler delays, machine-wide, instead of samples.
        let kind = if metric.mode == "rpc" {
            ProfileKind::SchedulerDelays
        } else {
            ProfileKind::Samples
        };
        let profile = (self.o.profile
            && (setup.transport.is_some()
                || (kind == ProfileKind::SchedulerDelays && setup.name == "direct")))
            .then(|| Profile::start(kind, self.daemons))
            .transpose()?;
        // New connections through the mesh: how long each waited, from the proxy's accept to
        // its destination's answer (connect, header exchange), which is what sending the
        // header with the first bytes could take off a connection's first byte.
        let timed = metric.mode == "connrate" && setup.transport.is_some();
        let setup_before = timed.then(|| connect_time(self.source)).transpose()?;
        let cpu_before = Cpu::now(self.daemons)?;
        let wall = std::time::Instant::now();
        let out = match run_client(self.o, self.topo, metric, setup, self.tls_dir) {
            Ok(out) => out,
            Err(e) if setup.local_hop == "sockmap" && sockmap_refused(&e) => {
                drop(profile);
                failed.push((metric.name.to_owned(), setup.name.to_owned(), e.to_string()));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let wall = wall.elapsed().as_secs_f64();
        let cpu = Cpu::now(self.daemons)?.since(&cpu_before);
        if let Some((sum, count)) = setup_before {
            let (sum_after, count_after) = connect_time(self.source)?;
            if count_after > count {
                put(
                    format!("{}.connect_setup_us", metric.name),
                    setup.name,
                    (sum_after - sum) / (count_after - count) * 1e6,
                );
            }
        }
        if let Some(profile) = profile {
            let file = self.o.out_dir.join(format!(
                "profile-{}-{}-{round}.txt",
                metric.name, setup.name
            ));
            profile.finish(&file)?;
        }
        // Work units: GB for bulk, connections (in µs per connection) for connrate.
        let units = match metric.mode {
            "bulk" => out["bytes"].as_f64().map(|b| (b / 1e9, "s_per_gb", 1.0)),
            "connrate" => out["connections"].as_f64().map(|c| (c, "us_per_conn", 1e6)),
            _ => None,
        };
        if let Some((units, unit, scale)) = units.filter(|(u, ..)| *u > 0.0) {
            let per = |seconds: f64| seconds * scale / units;
            let name = metric.name;
            put(
                format!("{name}.machine_cpu_{unit}"),
                setup.name,
                per(cpu.machine),
            );
            put(format!("{name}.busy_cores"), setup.name, cpu.machine / wall);
            if setup.name.starts_with("mycel") {
                put(
                    format!("{name}.cpu_{unit}"),
                    setup.name,
                    per(cpu.daemons_user + cpu.daemons_sys),
                );
                put(
                    format!("{name}.daemon_sys_{unit}"),
                    setup.name,
                    per(cpu.daemons_sys),
                );
            }
        }
        for field in metric.fields {
            let v = out[*field].as_f64().ok_or_else(|| {
                io::Error::other(format!(
                    "{} {}: no {field} in {out}",
                    metric.name, setup.name
                ))
            })?;
            put(format!("{}.{field}", metric.name), setup.name, v);
        }
        Ok(())
    }
}

/// `mycel_tcp_connect_duration_seconds` of `node` so far: its sum and count.
fn connect_time(node: &MeshNode) -> io::Result<(f64, f64)> {
    let text = node.metrics_text()?;
    let e = crate::prom::Exposition::parse(&text).map_err(io::Error::other)?;
    Ok((
        e.sum("mycel_tcp_connect_duration_seconds_sum", &[]),
        e.sum("mycel_tcp_connect_duration_seconds_count", &[]),
    ))
}

/// The daemons' threads: one core per node.
const WORKERS: [&str; 2] = ["--workers", "1"];

/// A run that failed leaves no perf recording behind.
impl Drop for Profile {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.data);
    }
}

/// What `--profile` records while one client runs.
#[derive(Clone, Copy, PartialEq)]
enum ProfileKind {
    /// `perf record -g` of the node daemons: where their CPU goes.
    Samples,
    /// `perf sched record` of the whole machine: how long each woken task waited to run.
    SchedulerDelays,
}

struct Profile {
    kind: ProfileKind,
    perf: std::process::Child,
    data: PathBuf,
}

impl Profile {
    fn start(kind: ProfileKind, pids: &[u32]) -> io::Result<Self> {
        let data =
            std::env::temp_dir().join(format!("mycel-bench-perf-{}.data", std::process::id()));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut perf = Command::new("perf");
        match kind {
            ProfileKind::Samples => perf
                .args(["record", "-q", "-F", "1999", "-g", "-o"])
                .arg(&data)
                .args(["-p", &pids.join(",")]),
            ProfileKind::SchedulerDelays => perf.args(["sched", "record", "-a", "-o"]).arg(&data),
        };
        let perf = perf
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::other(format!("cannot run perf (apt-get install linux-perf): {e}"))
            })?;
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { kind, perf, data })
    }

    fn stop(&mut self) {
        if matches!(self.perf.try_wait(), Ok(None)) {
            // SAFETY: signalling a child this process spawned and has not reaped.
            unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
            let _ = self.perf.wait();
        }
    }

    /// Stops recording and writes the flat profile (self time by symbol) to `out`.
    fn finish(mut self, out: &Path) -> io::Result<()> {
        self.stop();
        let mut report = Command::new("perf");
        match self.kind {
            ProfileKind::Samples => report.args([
                "report",
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--percent-limit",
                "0.5",
                "-i",
            ]),
            ProfileKind::SchedulerDelays => report.args(["sched", "latency", "-i"]),
        };
        // The data file goes when `self` does.
        let report = report.arg(&self.data).stderr(Stdio::null()).output();
        std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(out, report?.stdout)
    }
}

/// CPU time so far: the node daemons' user and kernel time, and the whole machine's busy time.
///
/// The machine's figure is what bounds the ratios: these kernels charge softirq work (the TCP
/// receive path of veth traffic) to whichever task is running, so the traffic's cost is spread
/// over the client, server and daemons; only the sum over the machine holds all of it.
#[derive(Clone, Copy)]
struct Cpu {
    daemons_user: f64,
    daemons_sys: f64,
    machine: f64,
}

impl Cpu {
    fn now(daemons: &[u32]) -> io::Result<Self> {
        let ticks = clock_ticks();
        let (mut daemons_user, mut daemons_sys) = (0.0, 0.0);
        for pid in daemons {
            let (user, sys) = crate::procfs::cpu_seconds(*pid)?;
            daemons_user += user;
            daemons_sys += sys;
        }
        // cpu user nice system idle iowait irq softirq steal …: busy is all but idle, iowait
        // and steal (time the hypervisor gave to other machines).
        let stat = std::fs::read_to_string("/proc/stat")?;
        let busy: f64 = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .take(8)
            .enumerate()
            .filter(|(i, _)| ![3, 4, 7].contains(i))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum();
        Ok(Self {
            daemons_user,
            daemons_sys,
            machine: busy / ticks,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            daemons_user: self.daemons_user - before.daemons_user,
            daemons_sys: self.daemons_sys - before.daemons_sys,
            machine: self.machine - before.machine,
        }
    }
}

use crate::procfs::clock_ticks;

/// Resident memory of `pids`, in MB.
fn rss_mb(pids: &[u32]) -> io::Result<f64> {
    let mut mb = 0.0;
    for pid in pids {
        mb += crate::procfs::memory_mb(*pid, "VmRSS")?;
    }
    Ok(mb)
}

/// CPU seconds per GB for AES-256-GCM (the suite rustls picks first) to encrypt and decrypt
/// the same bytes in 16 KiB records, with ring, on this thread: what any TLS relay must spend.
fn crypto_floor(bytes: usize) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let Ok(unbound) = UnboundKey::new(&AES_256_GCM, &[7u8; 32]) else {
        return f64::NAN;
    };
    let key = LessSafeKey::new(unbound);
    const RECORD: usize = 16 * 1024;
    let mut buf = vec![0x5au8; RECORD];
    let records = (bytes / RECORD).max(1);
    let start = thread_cpu_seconds();
    for i in 0..records {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        buf.truncate(RECORD);
        let sealed = key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut buf,
        );
        let opened = sealed.and_then(|()| {
            key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
                .map(|plain| plain.len())
        });
        if opened != Ok(RECORD) {
            return f64::NAN;
        }
    }
    let seconds = thread_cpu_seconds() - start;
    seconds / ((records * RECORD) as f64 / 1e9)
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Both daemons' extra resident memory while `idle_connections` tunnelled connections are
/// open and idle, scaled to 1,000 connections, in MB.
fn idle_memory(o: &Options, topo: &Topology, daemons: &[u32]) -> io::Result<f64> {
    use std::io::BufRead as _;
    let idle = rss_mb(daemons)?;
    let server = topo.pod("s1");
    let mut cmd = Command::new(loadgen());
    cmd.args(["hold", "--addr", &format!("{}:{PORT}", server.ipv4)])
        .args(["--count", &o.idle_connections.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = topo.pod("c1").spawn(&mut cmd)?;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        io::BufReader::new(out).read_line(&mut line)?;
    }
    // Let the daemons settle (buffers allocated, tasks parked) before reading.
    std::thread::sleep(Duration::from_millis(500));
    let held = rss_mb(daemons);
    drop(child.stdin.take());
    let _ = child.wait();
    if !line.starts_with("held") {
        return Err(io::Error::other(format!("the hold client said {line:?}")));
    }
    Ok((held? - idle) * 1000.0 / o.idle_connections as f64)
}

/// Seconds from writing a policy file to both nodes acknowledging the version that has it
/// (a node acks once it has applied it, kernel fast-deny entries included). Alternates adding
/// and removing a policy that concerns both nodes: n2 enforces it, n1 refuses in the kernel.
fn policy_changes(o: &Options, cp: &mut ControlPlane) -> io::Result<Vec<f64>> {
    const FILE: &str = "bench-change.yaml";
    let policy = "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: { name: bench-change, namespace: default }\nspec: { selector: { matchLabels: { app: s1 } }, action: Deny, rules: [{ sourceIdentities: ['spiffe://cluster.local/ns/default/sa/c1'], ports: [9999] }] }\n";
    let mut out = Vec::new();
    for i in 0..o.policy_changes {
        let before = cp.version()?;
        let start = std::time::Instant::now();
        if i % 2 == 0 {
            cp.write_config(FILE, policy)?;
        } else {
            cp.remove_config(FILE)?;
        }
        loop {
            let s = cp.status()?;
            let version = s["config"]["version"].as_u64().unwrap_or(0);
            let acked = |n: &str| s["nodes"][n]["acked_version"].as_u64().unwrap_or(0);
            if version > before && acked("n1") >= version && acked("n2") >= version {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(io::Error::other(
                    "a policy change was not acknowledged within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        out.push(start.elapsed().as_secs_f64());
    }
    if o.policy_changes % 2 == 1 {
        let _ = cp.remove_config(FILE);
    }
    Ok(out)
}

fn run_client(
    o: &Options,
    topo: &Topology,
    metric: &Metric,
    setup: Setup,
    tls_dir: &Path,
) -> io::Result<Value> {
    let server = topo.pod(setup.server);
    let addr = if setup.vip {
        format!("{VIP}:{}", setup.port)
    } else {
        format!("{}:{}", server.ipv4, setup.port)
    };
    let mut cmd = Command::new(loadgen());
    cmd.args([
        metric.mode,
        "--addr",
        &addr,
        "--secs",
        &o.seconds.to_string(),
    ])
    .args(&metric.extra);
    if setup.tls {
        cmd.arg("--tls").arg(tls_dir);
    }
    let timeout = Duration::from_secs_f64(o.seconds * 4.0 + 30.0);
    let what = format!("{} {}", metric.name, setup.name);
    json_of(topo, setup.client, &mut cmd, timeout, &what)
}

/// Runs `cmd` in `pod` within `timeout`; the JSON it printed, or its error named `what`.
fn json_of(
    topo: &Topology,
    pod: &str,
    cmd: &mut Command,
    timeout: Duration,
    what: &str,
) -> io::Result<Value> {
    let out = topo.pod(pod).run(cmd, timeout)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(io::Error::other)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The ratios the performance targets are stated in: (name, numerator, denominator, target).
const RATIOS: [(&str, &str, &str, &str, &str); 17] = [
    (
        "bulk 1 stream ÷ direct",
        "bulk-1.bytes_per_second",
        "mycel-tls",
        "direct",
        "≥ 0.5",
    ),
    (
        "bulk 1 stream ÷ rustls",
        "bulk-1.bytes_per_second",
        "mycel-tls",
        "rustls",
        "≥ 0.9",
    ),
    (
        "new connections/s ÷ direct",
        "connrate.per_second",
        "mycel-tls",
        "direct",
        "≥ 0.7",
    ),
    (
        "1 KiB RPC p50 ÷ direct",
        "rpc.p50_us",
        "mycel-tls",
        "direct",
        "≤ 2.0",
    ),
    (
        "1 KiB RPC p99 ÷ direct",
        "rpc.p99_us",
        "mycel-tls",
        "direct",
        "≤ 3.0",
    ),
    (
        "HTTP/1.1 request p50 ÷ direct",
        "http-1.1.p50_us",
        "mycel-http",
        "direct",
        "≤ 2.0",
    ),
    (
        "HTTP/1.1 requests/s ÷ direct",
        "http-1.1.per_second",
        "mycel-http",
        "direct",
        "≥ 0.5",
    ),
    (
        "h2c req/s, 8 at once ÷ direct",
        "http-h2.per_second",
        "mycel-http",
        "direct",
        "≥ 0.5",
    ),
    (
        "HTTP/1.1 request p50 ÷ L4 port",
        "http-1.1.p50_us",
        "mycel-http",
        "mycel-l4",
        "—",
    ),
    (
        "QUIC bulk ÷ TLS bulk",
        "bulk-1.bytes_per_second",
        "mycel-quic",
        "mycel-tls",
        "≥ 0.6",
    ),
    (
        "same-node bulk ÷ direct",
        "bulk-1.bytes_per_second",
        "mycel-same-node",
        "direct",
        "—",
    ),
    // Computed from the CPU samples and the crypto floor (see `report`).
    ("CPU-s per GB ÷ crypto floor", "", "mycel-tls", "", "≤ 1.5"),
    // The same figures with the hop through the socket map, from the same run.
    (
        "bulk 1 stream ÷ direct, sockmap",
        "bulk-1.bytes_per_second",
        "mycel-tls-sockmap",
        "direct",
        "—",
    ),
    (
        "new connections/s ÷ direct, sockmap",
        "connrate.per_second",
        "mycel-tls-sockmap",
        "direct",
        "—",
    ),
    (
        "1 KiB RPC p50 ÷ direct, sockmap",
        "rpc.p50_us",
        "mycel-tls-sockmap",
        "direct",
        "—",
    ),
    (
        "same-node RPC p50 ÷ direct, sockmap",
        "rpc.p50_us",
        "mycel-same-node-sockmap",
        "direct",
        "—",
    ),
    (
        "CPU-s per GB ÷ crypto floor, sockmap",
        "",
        "mycel-tls-sockmap",
        "",
        "—",
    ),
];

fn report(
    o: &Options,
    samples: Samples,
    failed: &[(String, String, String)],
) -> io::Result<Report> {
    let med = |key: &str, setup: &str| {
        samples
            .get(key)
            .and_then(|m| m.get(setup))
            .map_or(f64::NAN, |v| median(v))
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<40} {}",
        "median (min..max)",
        SETUPS
            .iter()
            .map(|s| format!("{:>24}", s.name))
            .collect::<String>()
    );
    for (key, by_setup) in &samples {
        let (unit, scale, digits) = if key.ends_with("bytes_per_second") {
            ("MB/s", 1e-6, 0)
        } else if key.ends_with("_us")
            || key.ends_with("_us_per_conn")
            || key.ends_with("_us_per_request")
        {
            ("µs", 1.0, 0)
        } else if key.ends_with("per_second") {
            ("/s", 1.0, 0)
        } else if key.ends_with("busy_cores") {
            ("cores", 1.0, 2)
        } else if key.ends_with("rss_mb") {
            ("MB per 1000", 1.0, 1)
        } else {
            ("s", 1.0, 3)
        };
        let _ = write!(table, "{:<40}", format!("{key} ({unit})"));
        // Figures of the main setups go in their columns; any other (the HTTP figures' own
        // setups, the crypto floor) is listed by name.
        let in_columns = by_setup.keys().all(|k| SETUPS.iter().any(|s| s.name == k));
        let names: Vec<&str> = if in_columns {
            SETUPS.iter().map(|s| s.name).collect()
        } else {
            by_setup.keys().map(String::as_str).collect()
        };
        for name in names {
            let Some(v) = by_setup.get(name).cloned() else {
                let _ = write!(table, " {:>24}", "—");
                continue;
            };
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min) * scale;
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) * scale;
            let _ = write!(
                table,
                " {:>24}",
                format!(
                    "{:.digits$} ({:.digits$}..{:.digits$}) {}",
                    median(&v) * scale,
                    lo,
                    hi,
                    if in_columns { "" } else { name }
                )
                .trim_end()
            );
        }
        let _ = writeln!(table);
    }
    let _ = writeln!(table);
    let mut ratios = Vec::new();
    let floor = med("crypto-floor.cpu_s_per_gb", "aes-256-gcm");
    for (name, key, num, den, target) in RATIOS {
        let r = if key.is_empty() {
            med("bulk-1.cpu_s_per_gb", num) / floor
        } else {
            med(key, num) / med(key, den)
        };
        let bound = kernel_bound(&med, key, num, den, floor);
        let _ = write!(table, "{name:<32} {r:>6.2}   target {target:<6}");
        if bound.is_finite() {
            let _ = write!(table, "   kernel-work bound {bound:.2}");
        }
        let _ = writeln!(table);
        ratios.push(json!({
            "name": name, "metric": key, "setup": num, "baseline": den, "ratio": r,
            "target": target, "kernel_work_bound": bound.is_finite().then_some(bound),
        }));
    }
    // The error names the metric and the setup.
    for (_, _, error) in failed {
        let _ = writeln!(table, "failed run: {error}");
    }
    let policy_change = med("policy-change.seconds", "mycel-tls");
    let _ = writeln!(
        table,
        "{:<32} {policy_change:>6.3}   target < 1 s",
        "policy change → both nodes (s)"
    );
    for (transport, setup) in [("TLS", "mycel-tls"), ("QUIC", "mycel-quic")] {
        let idle = med("idle-1000.rss_mb", setup);
        let _ = writeln!(
            table,
            "{:<32} {idle:>6.1}   target ≤ 16 MB",
            format!("RSS per 1000 idle conns, {transport}")
        );
    }
    let json = json!({
        "seconds_per_run": o.seconds,
        "rounds": o.rounds,
        "rpc_rate": o.rpc_rate,
        "setups": SETUPS.iter().map(|s| s.name).collect::<Vec<_>>(),
        "samples": samples,
        "ratios": ratios,
        "failed_runs": failed.iter().map(|(metric, setup, error)| json!({
            "metric": metric, "setup": setup, "error": error,
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&o.out_dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let file = o.out_dir.join(format!("bench-{stamp}.json"));
    let text = serde_json::to_string_pretty(&json).map_err(io::Error::other)?;
    std::fs::write(&file, &text)?;
    std::fs::write(o.out_dir.join("latest.json"), &text)?;
    let svg = chart(&ratios);
    std::fs::write(o.out_dir.join(format!("bench-{stamp}.svg")), &svg)?;
    std::fs::write(o.out_dir.join("latest.svg"), &svg)?;
    Ok(Report {
        samples,
        json,
        table,
        file,
    })
}

/// The best a ratio could be if the daemons' user-space work cost nothing but the AES-GCM
/// floor, so that only their kernel work (socket calls, copies, the TCP stack of the extra hops)
/// and the applications' own cost remained; NaN for ratios it does not apply to.
///
/// For throughputs this is the baseline's machine CPU per unit of work over the mesh's, with
/// the daemons' user time replaced by the floor: the bound holds while both runs keep the
/// machine's cores busy (`busy_cores` in the table). For CPU ÷ floor it is the daemons' kernel
/// time per GB plus the floor, over the floor.
fn kernel_bound(
    med: &dyn Fn(&str, &str) -> f64,
    key: &str,
    num: &str,
    den: &str,
    floor: f64,
) -> f64 {
    let mesh_floor = |metric: &str, unit: &str, crypto: f64| {
        let machine = med(&format!("{metric}.machine_cpu_{unit}"), num);
        let daemons = med(&format!("{metric}.cpu_{unit}"), num);
        let kernel = med(&format!("{metric}.daemon_sys_{unit}"), num);
        machine - (daemons - kernel) + crypto
    };
    match (key, num) {
        ("", _) => (med("bulk-1.daemon_sys_s_per_gb", num) + floor) / floor,
        ("bulk-1.bytes_per_second", "mycel-tls" | "mycel-tls-sockmap") => {
            med("bulk-1.machine_cpu_s_per_gb", den) / mesh_floor("bulk-1", "s_per_gb", floor)
        }
        ("connrate.per_second", "mycel-tls" | "mycel-tls-sockmap") => {
            med("connrate.machine_cpu_us_per_conn", den)
                / mesh_floor("connrate", "us_per_conn", 0.0)
        }
        _ => f64::NAN,
    }
}

/// A horizontal bar per ratio, with its target as a tick, as a self-contained SVG.
fn chart(ratios: &[Value]) -> String {
    const ROW: f64 = 34.0;
    const LEFT: f64 = 250.0;
    const WIDTH: f64 = 420.0;
    // The axis runs to 2.0 or the largest ratio, whichever is more.
    let max = ratios
        .iter()
        .flat_map(|r| [r["ratio"].as_f64(), r["kernel_work_bound"].as_f64()])
        .flatten()
        .filter(|r| r.is_finite())
        .fold(2.0f64, f64::max);
    let x = |v: f64| LEFT + WIDTH * (v / max).clamp(0.0, 1.0);
    let height = 60.0 + ROW * ratios.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">Mycel ÷ baseline, same run (bar: measured, red tick: target, grey dashes: bound from kernel work)</text>\n",
        LEFT + WIDTH + 150.0
    );
    for (i, r) in ratios.iter().enumerate() {
        let y = 40.0 + ROW * i as f64;
        let name = r["name"].as_str().unwrap_or("?");
        let ratio = r["ratio"].as_f64().unwrap_or(f64::NAN);
        let target = r["target"].as_str().unwrap_or("");
        let _ = write!(
            svg,
            "<text x=\"10\" y=\"{:.0}\">{}</text>\n<rect x=\"{LEFT}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"20\" fill=\"#4a7fb5\"/>\n<text x=\"{:.1}\" y=\"{:.0}\">{ratio:.2}</text>\n",
            y + 15.0,
            name.replace('&', "&amp;").replace('<', "&lt;"),
            x(if ratio.is_finite() { ratio } else { 0.0 }) - LEFT,
            x(if ratio.is_finite() { ratio } else { 0.0 }) + 5.0,
            y + 15.0,
        );
        let goal: Option<f64> = target.trim_start_matches(['≥', '≤', ' ']).parse().ok();
        if let Some(goal) = goal {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.0}\" y2=\"{2:.0}\" stroke=\"#c0392b\" stroke-width=\"3\"/>",
                x(goal),
                y - 3.0,
                y + 23.0
            );
        }
        if let Some(bound) = r["kernel_work_bound"].as_f64() {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.0}\" y2=\"{2:.0}\" stroke=\"#555\" stroke-width=\"2\" stroke-dasharray=\"3,2\"/>",
                x(bound),
                y - 3.0,
                y + 23.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
