//! `cargo xtask`: the project's own commands. See `cargo xtask --help`.

mod fuzz;
mod prereqs;
mod up;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, try and test Mycel")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF programs (installs nightly rust-src and bpf-linker if missing).
    BuildEbpf,
    /// Install what is missing, then run every check and test: fmt, clippy, unit and
    /// end-to-end tests in real network namespaces (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Start a local sandbox mesh (two nodes, six pods, mesh-cp) with demo traffic.
    Up {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
        /// Keep the mesh in etcd (started on loopback) and run two mesh-cp replicas; the
        /// nodes name both.
        #[arg(long)]
        ha: bool,
    },
    /// Remove namespaces, cgroups and temp files left by killed test or sandbox runs.
    Clean,
    /// Regenerate the CRDs under deploy/crds/ from the Rust types in mesh-model.
    Crds,
    /// Fuzz what reaches Mycel from outside (fuzz/: the tunnel handshake and records, the
    /// tunnel header, certificates, CSRs, the CNI request, config documents, node tokens)
    /// with cargo-fuzz on nightly; installs cargo-fuzz if missing. Fails when a
    /// target finds a fault; the input is kept under target/fuzz/artifacts/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        time: u64,
        /// One target only (default: all of them, one after the other).
        target: Option<String>,
    },
    /// Measure what the mesh costs against baselines in the same run (release build, two-node
    /// sandbox): a table on stdout, JSON under target/bench/.
    Bench {
        /// A short run (seconds) that only checks the harness works; its figures mean little.
        #[arg(long)]
        quick: bool,
        /// Measure one figure only: bulk-1, bulk-4, rpc, connrate, http-1.1, http-h2, idle or
        /// policy.
        #[arg(long, value_parser = ["bulk-1", "bulk-4", "rpc", "connrate", "http-1.1", "http-h2", "idle", "policy"])]
        only: Option<String>,
        /// Record a perf profile of both node daemons during each Mycel run and write the top
        /// symbols to target/bench/profile-<figure>-<setup>-<round>.txt (for rpc: the
        /// machine's scheduler delays, `perf sched latency`, direct run included).
        #[arg(long)]
        profile: bool,
    },
    /// Serve a fleet of emulated nodes from one real mesh-cp (release build): each node its
    /// own TLS config stream, all in one process. Measures the cold sync, mesh-cp's memory
    /// and CPU, single changes reaching every node they concern, and a reconnect storm: a
    /// table on stdout, JSON under target/scale/.
    Scale {
        /// A smoke run: 100 nodes, 2,000 workloads.
        #[arg(long)]
        quick: bool,
        /// The emulated nodes take other nodes' workloads on demand (each watches one
        /// Service's endpoints and an address outside the mesh) instead of every workload.
        #[arg(long)]
        on_demand: bool,
        /// Emulated nodes (default 1,000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=60_000))]
        nodes: Option<u32>,
        /// Workloads in the generated mesh (default 20,000), with one service per 10 and one
        /// access policy per 40.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        workloads: Option<u32>,
        /// Seconds any one phase (the cold sync, a change, the storm) may take before the run
        /// fails (default 600; 120 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::BuildEbpf => prereqs::ensure_build()
            .and_then(|()| build_ebpf())
            .map(|p| {
                println!("xtask: eBPF object at {}", p.display());
            }),
        Cmd::Test { cargo_test_args } => test(&cargo_test_args),
        Cmd::Up { duration, ha } => up::run(duration, ha),
        Cmd::Fuzz { time, target } => {
            prereqs::ensure_fuzz().and_then(|()| fuzz::run(time, target.as_deref()))
        }
        Cmd::Clean => clean(),
        Cmd::Bench {
            quick,
            only,
            profile,
        } => bench(quick, only, profile),
        Cmd::Scale {
            quick,
            on_demand,
            nodes,
            workloads,
            timeout,
        } => scale(quick, on_demand, nodes, workloads, timeout),
        Cmd::Crds => cargo(
            "generate CRDs",
            &[
                "run",
                "-q",
                "-p",
                "mesh-model",
                "--features",
                "crd",
                "--example",
                "crds",
                "--",
                "deploy/crds",
            ],
        ),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn build_ebpf() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target = mesh_ebpf_build::default_target_dir(&root);
    Ok(mesh_ebpf_build::build(&root, &target)?)
}

fn cargo(what: &str, args: &[&str]) -> anyhow::Result<()> {
    println!("xtask: {what}: cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("{what} failed: cargo {} ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the workspace's binaries (mesh-node embeds the eBPF object via its build script).
pub fn build_bins() -> anyhow::Result<()> {
    cargo("build", &["build", "--workspace", "--bins"])
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    prereqs::ensure_all()?;
    let object = build_ebpf()?;
    println!("xtask: eBPF object at {}", object.display());
    cargo("format check", &["fmt", "--all", "--", "--check"])?;
    cargo(
        "format check of fuzz/",
        &["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"],
    )?;
    cargo(
        "lint",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    build_bins()?;
    let locks_before = cgroup_locks();
    let pins_before = host_pins();
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    let result = cargo("tests", &args);
    // Every fuzz target over its seeds (a filtered run of the tests skips it).
    let result = if extra.is_empty() {
        result.and_then(|()| fuzz::smoke())
    } else {
        result
    };
    // Every test tears its topology down in Drop; anything left here is a bug worth failing on.
    let left = mesh_tests::topology::clean_prefix(mesh_tests::topology::TEST_PREFIX)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    result?;
    if !left.namespaces.is_empty() || !left.cgroups.is_empty() || !left.bpffs.is_empty() {
        bail!(
            "tests left namespaces {:?}, cgroups {:?} and bpffs mounts {:?} behind (now removed)",
            left.namespaces,
            left.cgroups,
            left.bpffs
        );
    }
    // Tests pin in bpffs mounts of their own, never in the host's.
    let host_pins: Vec<_> = host_pins().difference(&pins_before).cloned().collect();
    if !host_pins.is_empty() {
        bail!("tests pinned in the host's bpffs: {host_pins:?} under {HOST_PINS}");
    }
    // Failing tests keep their daemons' logs on purpose; passing ones must leave nothing.
    let files = remove_temp_entries(mesh_tests::topology::TEST_PREFIX)?;
    if !files.is_empty() {
        bail!("tests left temp files behind (now removed): {files:?}");
    }
    // A daemon stopped cleanly removes its claim on its cgroup; one left means a daemon was
    // killed instead (lifecycle's deliberate crash is followed by a clean restart).
    let locks: Vec<_> = cgroup_locks().difference(&locks_before).cloned().collect();
    for name in &locks {
        let _ = std::fs::remove_file(Path::new(CGROUP_LOCK_DIR).join(name));
    }
    if !locks.is_empty() {
        bail!("tests left cgroup lock files in {CGROUP_LOCK_DIR} (now removed): {locks:?}");
    }
    println!(
        "xtask: all checks passed; no namespaces, cgroups, bpffs pins, lock files or temp files left behind"
    );
    Ok(())
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn bench(quick: bool, only: Option<String>, profile: bool) -> anyhow::Result<()> {
    prereqs::ensure_all()?;
    cargo(
        "release build",
        &["build", "--release", "--workspace", "--bins"],
    )?;
    let release = target_dir().join("release");
    // The harness finds the daemons and the load generator through these. One already set is
    // kept, so a daemon can run under a profiler (a wrapper script that execs heaptrack, say).
    for (var, bin) in [
        ("MESH_NODE_BIN", "mesh-node"),
        ("MESH_CP_BIN", "mesh-cp"),
        ("MESH_LOADGEN_BIN", "mesh-loadgen"),
        ("MESH_HTTP_BIN", "mesh-http"),
    ] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, release.join(bin));
        }
    }
    let out_dir = target_dir().join("bench");
    let mut options = if quick {
        mesh_tests::bench::Options::quick("mycel-bench", out_dir)
    } else {
        mesh_tests::bench::Options::full("mycel-bench", out_dir)
    };
    options.only = only;
    options.profile = profile;
    println!(
        "xtask: benchmarking: {} interleaved round(s) of {} s per setup and metric",
        options.rounds, options.seconds
    );
    let report = mesh_tests::bench::run(&options).context("the benchmark failed")?;
    println!("\n{}", report.table);
    println!("xtask: report written to {}", report.file.display());
    Ok(())
}

fn scale(
    quick: bool,
    on_demand: bool,
    nodes: Option<u32>,
    workloads: Option<u32>,
    timeout: Option<u64>,
) -> anyhow::Result<()> {
    cargo(
        "release build",
        &["build", "--release", "-p", "mesh-cp", "--bin", "mesh-cp"],
    )?;
    if std::env::var_os("MESH_CP_BIN").is_none() {
        std::env::set_var("MESH_CP_BIN", target_dir().join("release").join("mesh-cp"));
    }
    let out_dir = target_dir().join("scale");
    let mut options = if quick {
        mesh_tests::scale::Options::quick("mycel-scale", out_dir)
    } else {
        mesh_tests::scale::Options::full("mycel-scale", out_dir)
    };
    if nodes.is_some() || workloads.is_some() {
        options.shape = mesh_tests::scale::Shape::new(
            nodes.map_or(options.shape.nodes, |n| n as usize),
            workloads.map_or(options.shape.workloads, |w| w as usize),
        );
    }
    if let Some(t) = timeout {
        options.timeout = std::time::Duration::from_secs(t);
    }
    options.on_demand = on_demand;
    let s = options.shape;
    println!(
        "xtask: scale: {} nodes, {} workloads, {} services, {} policies{}",
        s.nodes,
        s.workloads,
        s.services,
        s.policies,
        if on_demand {
            ", workloads on demand"
        } else {
            ""
        }
    );
    let report = mesh_tests::scale::run(&options).context("the scale run failed")?;
    // Its files go; the report stays.
    let _ = remove_temp_entries("mycel-scale");
    println!("\n{}", report.table);
    println!("xtask: report written to {}", report.file.display());
    Ok(())
}

fn clean() -> anyhow::Result<()> {
    let cleaned = mesh_tests::topology::clean_prefix(mesh_tests::topology::PREFIX)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let files = remove_temp_entries(mesh_tests::topology::PREFIX)?.len();
    println!(
        "xtask: removed {} namespaces, {} cgroups, {} bpffs mounts, {files} temp files and dirs",
        cleaned.namespaces.len(),
        cleaned.cgroups.len(),
        cleaned.bpffs.len()
    );
    Ok(())
}

/// Where mesh-node pins its maps and links on the host, one directory per node.
const HOST_PINS: &str = "/sys/fs/bpf/mycel";

fn host_pins() -> std::collections::BTreeSet<String> {
    entry_names(HOST_PINS)
}

/// Where mesh-node keeps its per-cgroup lock files.
const CGROUP_LOCK_DIR: &str = "/run/mycel";

fn cgroup_locks() -> std::collections::BTreeSet<String> {
    entry_names(CGROUP_LOCK_DIR)
}

/// The names in `dir`; none when it cannot be read.
fn entry_names(dir: &str) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the temp dir's entries named with `prefix` (daemons' scratch dirs, loose files such
/// as kept captures); returns their names.
fn remove_temp_entries(prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(prefix) {
                continue;
            }
            let result = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
            result.with_context(|| format!("cannot remove {}", e.path().display()))?;
            removed.push(name);
        }
    }
    Ok(removed)
}
