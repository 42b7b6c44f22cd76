//! `cargo xtask scale`: one real mesh-cp serving a fleet of emulated nodes ([`emulator`]) on a
//! generated mesh ([`generate`]). It measures the cold sync of every node, mesh-cp's memory and
//! CPU, how long single changes take to reach every node they concern (and what they cost
//! mesh-cp), and a storm of every node reconnecting at once. The figures go to a table and
//! to `latest.json` under the output dir. No time is asserted: the quick run in the test
//! suite checks only that every phase completes and every node is served.

pub mod emulator;
pub mod generate;

use std::{
    io,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{procfs, ControlPlane};
pub use generate::Shape;

pub struct Options {
    pub prefix: String,
    pub shape: Shape,
    /// Single changes timed (a workload added, a policy changed, alternately).
    pub changes: usize,
    /// How long any one phase may take before the run fails.
    pub timeout: Duration,
    pub out_dir: PathBuf,
    /// The nodes take other nodes' workloads on demand, each watching a Service's endpoints
    /// and an address outside the mesh ([`Shape::demand`]).
    pub on_demand: bool,
}

impl Options {
    /// The default run: 1,000 nodes, 20,000 workloads.
    pub fn full(prefix: &str, out_dir: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            shape: Shape::new(1_000, 20_000),
            changes: 10,
            timeout: Duration::from_secs(600),
            out_dir,
            on_demand: false,
        }
    }

    /// A smoke run: 100 nodes, 2,000 workloads, four changes.
    pub fn quick(prefix: &str, out_dir: PathBuf) -> Self {
        Self {
            prefix: prefix.into(),
            shape: Shape::new(100, 2_000),
            changes: 4,
            timeout: Duration::from_secs(120),
            out_dir,
            on_demand: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangeFigures {
    pub what: String,
    /// Nodes the change concerns, all of which received it.
    pub nodes: usize,
    /// From writing the file (mesh-cp polls its dir every 0.1 s) to a node having the
    /// version whole, over the nodes concerned.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// mesh-cp CPU for the change, above its idle rate.
    pub cp_cpu_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub shape: Shape,
    pub on_demand: bool,
    /// On demand: what one node watches, and the addresses all were answered as absent.
    pub watched_per_node: usize,
    pub absent: usize,
    /// mesh-cp from start to ready (loading and validating the config dir, first catalog).
    pub cp_start_s: f64,
    /// From starting every stream at once to every node holding a snapshot.
    pub cold_sync_s: f64,
    pub cold_sync_cp_cpu_s: f64,
    /// What one node's snapshot held and weighed.
    pub snapshot_resources: usize,
    pub snapshot_mb: f64,
    pub cp_rss_mb: f64,
    pub cp_peak_rss_mb: f64,
    /// mesh-cp CPU per second with every node connected and nothing changing.
    pub cp_idle_cpu_per_s: f64,
    pub changes: Vec<ChangeFigures>,
    /// Every stream dropped at once: until every node has resumed.
    pub storm_s: f64,
    pub storm_resumed: usize,
    pub storm_snapshots: usize,
    pub storm_mb: f64,
    pub storm_cp_cpu_s: f64,
    #[serde(skip)]
    pub table: String,
    #[serde(skip)]
    pub file: PathBuf,
}

fn cpu(pid: u32) -> io::Result<f64> {
    procfs::cpu_seconds(pid).map(|(u, s)| u + s)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(o: &Options) -> io::Result<Report> {
    let shape = o.shape;
    let files = shape.files();
    let file_refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let started = Instant::now();
    let mut cp = ControlPlane::start_slow(&o.prefix, &file_refs, o.timeout)?;
    let cp_start_s = started.elapsed().as_secs_f64();
    let pid = cp
        .daemon()
        .pid()
        .ok_or_else(|| io::Error::other("mesh-cp has no pid"))?;
    let names: Vec<String> = (0..shape.nodes).map(|i| shape.node(i)).collect();
    let tokens = cp.create_tokens(&names)?;
    let ca = std::fs::read(cp.ca_cert())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let fail = |what: &str, lagging: Vec<(String, emulator::Held)>| {
        let shown: Vec<_> = lagging.iter().take(3).collect();
        io::Error::other(format!(
            "{what}: {} nodes not there within {:?}, e.g. {shown:?}",
            lagging.len(),
            o.timeout
        ))
    };
    let report = runtime.block_on(async {
        // Cold: every node at once.
        let version = cp.version()?;
        let cpu0 = cpu(pid)?;
        let t0 = Instant::now();
        let demands: Vec<Option<emulator::Demand>> = (0..shape.nodes)
            .map(|n| o.on_demand.then(|| shape.demand(n)))
            .collect();
        let watched_per_node = demands
            .first()
            .and_then(|d| d.as_ref())
            .map_or(0, |d| d.keys.len() + d.addresses.len());
        let fleet = emulator::Fleet::start(cp.grpc, &ca, tokens, demands);
        // Synced: the snapshot in, and on demand the answer to its watches too (the one
        // address outside the mesh answered absent).
        let synced = |h: &emulator::Held| {
            h.snapshots >= 1 && h.version >= version && (!o.on_demand || h.absent >= 1)
        };
        if !fleet.wait_all(o.timeout, synced).await {
            return Err(fail("cold sync", fleet.lagging(synced)));
        }
        let cold_sync_s = t0.elapsed().as_secs_f64();
        let cold_sync_cp_cpu_s = cpu(pid)? - cpu0;
        let absent = fleet.nodes.iter().map(|n| n.held().absent).sum();
        let first = fleet.nodes[0].held();
        let snapshot_resources = first.snapshot_resources;
        let snapshot_mb = first.bytes as f64 / 1e6;

        // Idle, every node connected.
        let (c0, t0) = (cpu(pid)?, Instant::now());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cp_idle_cpu_per_s = (cpu(pid)? - c0) / t0.elapsed().as_secs_f64();
        let cp_rss_mb = procfs::memory_mb(pid, "VmRSS")?;

        let mut changes = Vec::new();
        for k in 0..o.changes {
            let before = cp.version()?;
            let (what, concerned): (String, Vec<usize>) = if k % 2 == 0 {
                let i = shape.workloads + k;
                cp.write_config(&format!("added-{k}.yaml"), &shape.workload(i))?;
                ("a workload added".into(), (0..shape.nodes).collect())
            } else {
                // Policy 0 changes port; its workloads' nodes are concerned.
                let port = 9000 + k as u16;
                let mut text = shape.policy(0, port);
                for p in 1..shape.policies {
                    text.push_str(&shape.policy(p, 8080));
                }
                cp.write_config("policies.yaml", &text)?;
                (
                    "a policy changed".into(),
                    shape.policy_nodes(0).into_iter().collect(),
                )
            };
            let (c0, t0) = (cpu(pid)?, Instant::now());
            let reached = |h: &emulator::Held| h.version > before;
            let deadline = Instant::now() + o.timeout;
            loop {
                if concerned.iter().all(|&n| reached(&fleet.nodes[n].held())) {
                    break;
                }
                if Instant::now() > deadline {
                    let lagging = concerned
                        .iter()
                        .map(|&n| (fleet.nodes[n].name.clone(), fleet.nodes[n].held()))
                        .filter(|(_, h)| !reached(h))
                        .collect();
                    return Err(fail(&what, lagging));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let took = t0.elapsed().as_secs_f64();
            let cp_cpu = (cpu(pid)? - c0 - cp_idle_cpu_per_s * took).max(0.0);
            let mut ms: Vec<f64> = concerned
                .iter()
                .filter_map(|&n| {
                    fleet.nodes[n]
                        .held()
                        .arrivals
                        .iter()
                        .find(|(v, _)| *v > before)
                        .map(|(_, at)| at.duration_since(t0).as_secs_f64() * 1e3)
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            changes.push(ChangeFigures {
                what,
                nodes: ms.len(),
                p50_ms: percentile(&ms, 0.5),
                p99_ms: percentile(&ms, 0.99),
                max_ms: ms.last().copied().unwrap_or(f64::NAN),
                cp_cpu_ms: cp_cpu * 1e3,
            });
            // Apart, so that each is timed alone.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        // Storm: every stream dropped at once.
        let held: Vec<emulator::Held> = fleet.nodes.iter().map(|n| n.held()).collect();
        let (c0, t0) = (cpu(pid)?, Instant::now());
        fleet.drop_all();
        let back = |i: usize, h: &emulator::Held| {
            h.resumes + h.snapshots > held[i].resumes + held[i].snapshots
        };
        let deadline = Instant::now() + o.timeout;
        loop {
            if fleet
                .nodes
                .iter()
                .enumerate()
                .all(|(i, n)| back(i, &n.held()))
            {
                break;
            }
            if Instant::now() > deadline {
                let lagging = fleet
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (i, n.name.clone(), n.held()))
                    .filter(|(i, _, h)| !back(*i, h))
                    .map(|(_, n, h)| (n, h))
                    .collect();
                return Err(fail("reconnect storm", lagging));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let storm_s = t0.elapsed().as_secs_f64();
        let storm_cp_cpu_s = cpu(pid)? - c0;
        let after: Vec<emulator::Held> = fleet.nodes.iter().map(|n| n.held()).collect();
        let storm_resumed = after
            .iter()
            .zip(&held)
            .filter(|(a, b)| a.resumes > b.resumes)
            .count();
        let storm_snapshots = after
            .iter()
            .zip(&held)
            .filter(|(a, b)| a.snapshots > b.snapshots)
            .count();
        let storm_mb = after
            .iter()
            .zip(&held)
            .map(|(a, b)| (a.bytes - b.bytes) as f64)
            .sum::<f64>()
            / 1e6;
        let cp_peak_rss_mb = procfs::memory_mb(pid, "VmHWM")?;
        drop(fleet);
        Ok(Report {
            shape,
            on_demand: o.on_demand,
            watched_per_node,
            absent,
            cp_start_s,
            cold_sync_s,
            cold_sync_cp_cpu_s,
            snapshot_resources,
            snapshot_mb,
            cp_rss_mb,
            cp_peak_rss_mb,
            cp_idle_cpu_per_s,
            changes,
            storm_s,
            storm_resumed,
            storm_snapshots,
            storm_mb,
            storm_cp_cpu_s,
            table: String::new(),
            file: PathBuf::new(),
        })
    });
    // The streams go before mesh-cp does.
    runtime.shutdown_timeout(Duration::from_secs(5));
    let mut report = report?;
    report.table = table(&report);
    std::fs::create_dir_all(&o.out_dir)?;
    let file = o.out_dir.join("latest.json");
    let json = serde_json::to_string_pretty(&report).map_err(io::Error::other)?;
    std::fs::write(&file, json)?;
    report.file = file;
    Ok(report)
}

fn table(r: &Report) -> String {
    let s = &r.shape;
    let mut out = format!(
        "scale: {} nodes, {} workloads, {} services, {} policies; one mesh-cp and the emulated nodes on this machine\n",
        s.nodes, s.workloads, s.services, s.policies
    );
    let mut row = |what: &str, figure: String| out.push_str(&format!("  {what:<34} {figure}\n"));
    if r.on_demand {
        row(
            "other nodes' workloads",
            format!(
                "on demand: each node watches {}, named first; {} addresses answered absent",
                r.watched_per_node, r.absent
            ),
        );
    }
    row("mesh-cp start to ready", format!("{:.1} s", r.cp_start_s));
    row(
        "cold sync, every node",
        format!(
            "{:.1} s; mesh-cp CPU {:.1} s; a snapshot {} resources, {:.2} MB",
            r.cold_sync_s, r.cold_sync_cp_cpu_s, r.snapshot_resources, r.snapshot_mb
        ),
    );
    row(
        "mesh-cp memory",
        format!(
            "RSS {:.0} MB synced, peak {:.0} MB",
            r.cp_rss_mb, r.cp_peak_rss_mb
        ),
    );
    row(
        "mesh-cp idle, all connected",
        format!("{:.3} CPU-s per s", r.cp_idle_cpu_per_s),
    );
    for c in &r.changes {
        row(
            &format!("{} ({} nodes)", c.what, c.nodes),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; mesh-cp CPU {:.0} ms",
                c.p50_ms, c.p99_ms, c.max_ms, c.cp_cpu_ms
            ),
        );
    }
    row(
        "reconnect storm, every node",
        format!(
            "{:.1} s; {} resumed, {} snapshots; {:.2} MB; mesh-cp CPU {:.1} s",
            r.storm_s, r.storm_resumed, r.storm_snapshots, r.storm_mb, r.storm_cp_cpu_s
        ),
    );
    out
}
