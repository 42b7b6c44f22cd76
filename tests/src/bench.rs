//! `cargo xtask bench`: what the mesh costs, as ratios against baselines measured in the same
//! run. The machines are shared and noisy, so every pair of setups is run interleaved (A B A B
//! …) and reported as medians with their spread; nothing here asserts a time.
//!
//! One topology holds every setup: a client and a server outside the mesh (direct, and
//! end-to-end rustls between the two applications), and a mesh client calling a mesh server on
//! the other node (Mycel TLS) and on its own node (Mycel same-node).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};

use crate::{
    mesh::{sibling_bin, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 9000;
const TLS_PORT: u16 = 9001;

pub struct Options {
    /// Topology name prefix (tests use the test prefix so leftovers are found and removed).
    pub prefix: String,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Interleaved rounds per metric.
    pub rounds: usize,
    /// Requests per second of the latency test.
    pub rpc_rate: u32,
    /// Where the JSON report goes.
    pub out_dir: PathBuf,
}

impl Options {
    pub fn full(prefix: &str, out_dir: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            seconds: 3.0,
            rounds: 3,
            rpc_rate: 1000,
            out_dir,
        }
    }

    /// A short run that exercises every path of the harness.
    pub fn quick(prefix: &str, out_dir: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            seconds: 0.5,
            rounds: 1,
            rpc_rate: 200,
            out_dir,
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
}

/// In the order they are interleaved; the first is the baseline for ratios.
pub const SETUPS: [Setup; 4] = [
    Setup {
        name: "direct",
        client: "c0",
        server: "s0",
        port: PORT,
        tls: false,
    },
    Setup {
        name: "rustls",
        client: "c0",
        server: "s0",
        port: TLS_PORT,
        tls: true,
    },
    Setup {
        name: "mycel-tls",
        client: "c1",
        server: "s1",
        port: PORT,
        tls: false,
    },
    Setup {
        name: "mycel-same-node",
        client: "c1",
        server: "s2",
        port: PORT,
        tls: false,
    },
];

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

/// A server process; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loadgen() -> PathBuf {
    sibling_bin("mesh-loadgen", "MESH_LOADGEN_BIN")
}

fn start_server(topo: &Topology, pod: &str, port: u16, tls: Option<&Path>) -> io::Result<Server> {
    use std::io::BufRead as _;
    let mut cmd = Command::new(loadgen());
    cmd.args(["serve", "--port", &port.to_string()]);
    if let Some(dir) = tls {
        cmd.arg("--tls").arg(dir);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = topo.pod(pod).spawn(&mut cmd)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let mut line = String::new();
    io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "listening" {
        let _ = child.kill();
        return Err(io::Error::other(format!(
            "loadgen server in {pod} did not start: {line:?}"
        )));
    }
    Ok(Server(child))
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
    let pods = ["c1", "s1", "s2"].map(|p| topo.pod(p));
    let cp = ControlPlane::start(
        &format!("{}-bench", topo.prefix),
        &[("workloads.yaml", &workloads_yaml(&pods))],
    )?;
    let _n1 = MeshNode::join(topo, "n1", &cp, 2)?;
    let _n2 = MeshNode::join(topo, "n2", &cp, 1)?;

    let mut samples = Samples::new();
    for metric in metrics(o) {
        for _ in 0..o.rounds {
            for setup in SETUPS {
                let out = run_client(o, topo, &metric, setup, tls_dir)?;
                for field in metric.fields {
                    let v = out[*field].as_f64().ok_or_else(|| {
                        io::Error::other(format!(
                            "{} {}: no {field} in {out}",
                            metric.name, setup.name
                        ))
                    })?;
                    samples
                        .entry(format!("{}.{field}", metric.name))
                        .or_default()
                        .entry(setup.name.to_owned())
                        .or_default()
                        .push(v);
                }
            }
        }
    }
    report(o, samples)
}

fn run_client(
    o: &Options,
    topo: &Topology,
    metric: &Metric,
    setup: Setup,
    tls_dir: &Path,
) -> io::Result<Value> {
    let server = topo.pod(setup.server);
    let addr = format!("{}:{}", server.ipv4, setup.port);
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
    let out = topo.pod(setup.client).run(&mut cmd, timeout)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} {}: {}",
            metric.name,
            setup.name,
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
const RATIOS: [(&str, &str, &str, &str, &str); 6] = [
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
        "same-node bulk ÷ direct",
        "bulk-1.bytes_per_second",
        "mycel-same-node",
        "direct",
        "—",
    ),
];

fn report(o: &Options, samples: Samples) -> io::Result<Report> {
    let med = |key: &str, setup: &str| {
        samples
            .get(key)
            .and_then(|m| m.get(setup))
            .map_or(f64::NAN, |v| median(v))
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<28} {}",
        "median (min..max)",
        SETUPS
            .iter()
            .map(|s| format!("{:>24}", s.name))
            .collect::<String>()
    );
    for (key, by_setup) in &samples {
        let (unit, scale) = if key.ends_with("bytes_per_second") {
            ("MB/s", 1e-6)
        } else if key.ends_with("_us") {
            ("µs", 1.0)
        } else {
            ("/s", 1.0)
        };
        let _ = write!(table, "{:<28}", format!("{key} ({unit})"));
        for s in SETUPS {
            let v = by_setup.get(s.name).cloned().unwrap_or_default();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min) * scale;
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) * scale;
            let _ = write!(
                table,
                " {:>24}",
                format!("{:.0} ({:.0}..{:.0})", median(&v) * scale, lo, hi)
            );
        }
        let _ = writeln!(table);
    }
    let _ = writeln!(table);
    let mut ratios = Vec::new();
    for (name, key, num, den, target) in RATIOS {
        let r = med(key, num) / med(key, den);
        let _ = writeln!(table, "{name:<32} {r:>6.2}   target {target}");
        ratios.push(json!({"name": name, "metric": key, "setup": num, "baseline": den, "ratio": r, "target": target}));
    }
    let json = json!({
        "seconds_per_run": o.seconds,
        "rounds": o.rounds,
        "rpc_rate": o.rpc_rate,
        "setups": SETUPS.iter().map(|s| s.name).collect::<Vec<_>>(),
        "samples": samples,
        "ratios": ratios,
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
    Ok(Report {
        samples,
        json,
        table,
        file,
    })
}
