//! The HTTP figures of `cargo xtask bench`: requests over one kept-alive connection, to a
//! server outside the mesh (direct), and to the same kind of server in the mesh through a
//! Service port that declares HTTP (`mycel-http`: the node proxy parses each request and picks
//! its endpoint) and through a port of the same Service relayed as bytes (`mycel-l4`). The
//! difference between the last two is what request awareness costs.
//!
//! - `http-1.1`: one request at a time (latency p50/p99, and the requests per second that
//!   latency allows).
//! - `http-h2`: HTTP/2 with prior knowledge, 8 requests at a time on one connection
//!   (throughput, and latency under it); the mesh's port declares `h2c`.

use std::{io, process::Command, time::Duration};

use serde_json::Value;

use super::{Cpu, Profile, ProfileKind};
use crate::{app::Server, mesh::sibling_bin, Topology};

/// Where `mesh-http serve` listens in s0 and s1.
pub(super) const HTTP_PORT: u16 = 9080;
/// s1's HTTP Service: port 80 declares `http`, 81 `h2c`, 82 nothing (L4).
pub(super) const HTTP_VIP: &str = "10.96.0.91";
/// Requests at once in the HTTP/2 figure.
const H2_CONCURRENCY: u32 = 8;

/// The metrics this module adds, as `--only` names them.
pub(super) const NAMES: [&str; 2] = ["http-1.1", "http-h2"];

fn mesh_http() -> Command {
    Command::new(sibling_bin("mesh-http", "MESH_HTTP_BIN"))
}

/// The Service s1's HTTP server is reached by.
pub(super) fn service_yaml() -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{ name: s1-http, namespace: default }}\nspec: {{ vips: ['{HTTP_VIP}'], ports: [{{ port: 80, targetPort: {HTTP_PORT}, appProtocol: http }}, {{ port: 81, targetPort: {HTTP_PORT}, appProtocol: h2c }}, {{ port: 82, targetPort: {HTTP_PORT} }}], selector: {{ app: s1 }} }}\n"
    )
}

/// `mesh-http serve` in s0 (outside the mesh) and s1 (in it).
pub(super) fn start_servers(topo: &Topology) -> io::Result<[Server; 2]> {
    let serve = |pod: &str| {
        Server::spawn(
            topo.pod(pod),
            mesh_http().args(["serve", "--port", &HTTP_PORT.to_string(), "--name", pod]),
        )
    };
    Ok([serve("s0")?, serve("s1")?])
}

/// Each setup's client pod and address, for HTTP/2 (`h2`) or HTTP/1.1.
fn setups(topo: &Topology, h2: bool) -> [(&'static str, &'static str, String); 3] {
    let http_port = if h2 { 81 } else { 80 };
    [
        (
            "direct",
            "c0",
            format!("{}:{HTTP_PORT}", topo.pod("s0").ipv4),
        ),
        ("mycel-l4", "c1", format!("{HTTP_VIP}:82")),
        ("mycel-http", "c1", format!("{HTTP_VIP}:{http_port}")),
    ]
}

/// Runs the figures in `names`, interleaving the setups `rounds` times; `put` takes each
/// sample as (`metric.field`, setup, value). Besides latency and throughput, each run's CPU
/// per request: the machine's, and for the mesh setups the node daemons' (`daemons`). With
/// `profile`, each mesh run's perf profile of the daemons goes to `out_dir`.
pub(super) fn measure(
    topo: &Topology,
    daemons: &[u32],
    names: &[&str],
    (seconds, rounds): (f64, usize),
    profile: Option<&std::path::Path>,
    put: &mut dyn FnMut(String, &str, f64),
) -> io::Result<()> {
    for name in names {
        let h2 = *name == "http-h2";
        // About `seconds` per run at direct's pace (some 5,000 requests a second one by one
        // here), more when several are in flight.
        let per_second = if h2 { 20_000.0 } else { 5_000.0 };
        let count = ((seconds * per_second) as u64).max(100);
        for round in 0..rounds {
            for (setup, client, addr) in setups(topo, h2) {
                let recording = profile
                    .filter(|_| setup != "direct")
                    .map(|_| Profile::start(ProfileKind::Samples, daemons))
                    .transpose()?;
                let before = Cpu::now(daemons)?;
                let out = run(topo, client, &addr, count, h2, seconds)?;
                let cpu = Cpu::now(daemons)?.since(&before);
                if let (Some(recording), Some(dir)) = (recording, profile) {
                    recording.finish(&dir.join(format!("profile-{name}-{setup}-{round}.txt")))?;
                }
                let ok = out["by_status"]["200"].as_u64() == Some(count);
                if !ok {
                    return Err(io::Error::other(format!(
                        "{name} {setup}: not every request was answered 200: {out}"
                    )));
                }
                for field in ["p50_us", "p99_us", "per_second"] {
                    let v = out[field].as_f64().ok_or_else(|| {
                        io::Error::other(format!("{name} {setup}: no {field} in {out}"))
                    })?;
                    put(format!("{name}.{field}"), setup, v);
                }
                let per_request = |seconds: f64| seconds * 1e6 / count as f64;
                put(
                    format!("{name}.machine_cpu_us_per_request"),
                    setup,
                    per_request(cpu.machine),
                );
                if setup != "direct" {
                    put(
                        format!("{name}.cpu_us_per_request"),
                        setup,
                        per_request(cpu.daemons_user + cpu.daemons_sys),
                    );
                    put(
                        format!("{name}.daemon_sys_us_per_request"),
                        setup,
                        per_request(cpu.daemons_sys),
                    );
                }
            }
        }
    }
    Ok(())
}

fn run(
    topo: &Topology,
    client: &str,
    addr: &str,
    count: u64,
    h2: bool,
    seconds: f64,
) -> io::Result<Value> {
    let mut cmd = mesh_http();
    cmd.args(["get", "--addr", addr, "--count", &count.to_string()]);
    if h2 {
        cmd.args(["--h2", "--concurrency", &H2_CONCURRENCY.to_string()]);
    }
    // A run far slower than direct's pace still ends; one that hangs does not hold the bench.
    let timeout = Duration::from_secs_f64(seconds * 20.0 + 30.0);
    super::json_of(
        topo,
        client,
        &mut cmd,
        timeout,
        &format!("mesh-http get {addr}"),
    )
}
