//! `cargo xtask fuzz`: the fuzz targets in `fuzz/` (see its README), built by cargo-fuzz on
//! the nightly toolchain and run by libFuzzer; and the short run over each target's seeds
//! that `cargo xtask test` makes, so that no target rots.
//!
//! A run's corpus grows under the target dir (`<target>/fuzz/corpus/<name>`, started from
//! `fuzz/seeds/<name>`), and what crashes lands in `<target>/fuzz/artifacts/<name>/`; the
//! repository keeps only the seeds.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// Every fuzz target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "handshake",
    "records",
    "tunnel_header",
    "certificate",
    "csr",
    "handoff_message",
    "cni_request",
    "config_document",
    "config_files",
    "node_token",
    "config_update",
    "http_message",
    "config_watch",
    "operator_answer",
];

/// libFuzzer's limits for every run: an input that takes longer is a hang, one that makes
/// the process hold more memory is a leak or a bomb; both are reported as findings.
const PER_INPUT_TIMEOUT: &str = "-timeout=10";
const RSS_LIMIT: &str = "-rss_limit_mb=2048";

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("fuzz")
}

fn out_dir() -> PathBuf {
    crate::target_dir().join("fuzz")
}

fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .context("cannot run the nightly rustc")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("nightly rustc -vV names no host")
}

/// Builds every target (release, with debug assertions, no sanitizer: the code under test is
/// safe Rust, and the assertions and libFuzzer's own limits are what find faults).
fn build() -> anyhow::Result<PathBuf> {
    let (out, dir) = (out_dir(), fuzz_dir());
    let (out_text, dir_text) = (out.to_string_lossy(), dir.to_string_lossy());
    let args = [
        "run",
        "nightly",
        "cargo",
        "fuzz",
        "build",
        "--sanitizer",
        "none",
        "--fuzz-dir",
        &dir_text,
        "--target-dir",
        &out_text,
    ];
    println!("xtask: build the fuzz targets: rustup {}", args.join(" "));
    // Through rustup, on nightly: cargo-fuzz needs it, and the outer cargo is stable.
    let status = Command::new("rustup")
        .args(args)
        .current_dir(crate::workspace_root())
        .status()
        .context("cannot run cargo fuzz")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    Ok(out.join(host_triple()?).join("release"))
}

fn copy_seeds(name: &str, corpus: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = fuzz_dir().join("seeds").join(name);
    for entry in fs::read_dir(&seeds).with_context(|| format!("cannot read {}", seeds.display()))? {
        let entry = entry?;
        fs::copy(entry.path(), corpus.join(entry.file_name()))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
    }
    Ok(())
}

/// For `cargo xtask test`: every target over its seeds, once each.
pub fn smoke() -> anyhow::Result<()> {
    let bins = build()?;
    for name in TARGETS {
        let seeds = fuzz_dir().join("seeds").join(name);
        let status = Command::new(bins.join(name))
            .arg(&seeds)
            .args(["-runs=0", PER_INPUT_TIMEOUT, RSS_LIMIT])
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| format!("cannot run the fuzz target {name}"))?;
        if !status.success() {
            bail!(
                "fuzz target {name} fails on its seeds ({status}): run `cargo xtask fuzz --time 1 {name}` to see why"
            );
        }
    }
    println!(
        "xtask: fuzz targets: all {} pass over their seeds",
        TARGETS.len()
    );
    Ok(())
}

/// What libFuzzer said of a run.
#[derive(Debug, Default)]
struct Stats {
    runs: u64,
    per_second: u64,
    corpus: u64,
}

fn stats(stderr: &str) -> Stats {
    let value = |key: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Stats {
        runs: value("stat::number_of_executed_units:"),
        per_second: value("stat::average_exec_per_sec:"),
        corpus: 0,
    }
}

/// Runs `only` (or every target) for `seconds` each; fails when one finds something.
pub fn run(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    if let Some(name) = only {
        if !TARGETS.contains(&name) {
            bail!("no fuzz target {name:?}; there are: {}", TARGETS.join(", "));
        }
    }
    let bins = build()?;
    let mut found = Vec::new();
    for name in TARGETS.iter().filter(|n| only.is_none_or(|o| o == **n)) {
        let corpus = out_dir().join("corpus").join(name);
        copy_seeds(name, &corpus)?;
        let artifacts = out_dir().join("artifacts").join(name);
        fs::create_dir_all(&artifacts)?;
        println!("xtask: fuzzing {name} for {seconds} s");
        let out = Command::new(bins.join(name))
            .arg(&corpus)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args([PER_INPUT_TIMEOUT, RSS_LIMIT, "-print_final_stats=1"])
            .output()
            .with_context(|| format!("cannot run the fuzz target {name}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut s = stats(&stderr);
        s.corpus = fs::read_dir(&corpus).map(|d| d.count() as u64).unwrap_or(0);
        if out.status.success() {
            println!(
                "xtask: fuzz {name}: {} runs in {seconds} s ({}/s), corpus {} inputs, nothing found",
                s.runs, s.per_second, s.corpus
            );
        } else {
            let why = stderr
                .lines()
                .filter(|l| {
                    l.contains("panicked at")
                        || l.contains("ERROR:")
                        || l.contains("Test unit written")
                })
                .collect::<Vec<_>>()
                .join("\n  ");
            println!("xtask: fuzz {name}: FOUND after {} runs:\n  {why}", s.runs);
            found.push(*name);
        }
    }
    if !found.is_empty() {
        bail!(
            "fuzz targets {} found faults; the inputs are under {}",
            found.join(", "),
            out_dir().join("artifacts").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_final_stats() {
        let s = stats(
            "INFO: x\nstat::number_of_executed_units: 1234\nstat::average_exec_per_sec:     56\n",
        );
        assert_eq!((s.runs, s.per_second), (1234, 56));
    }

    /// Every target in fuzz/Cargo.toml is run, and has seeds.
    #[test]
    fn every_target_is_listed_and_seeded() {
        let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let named: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "mesh-fuzz")
            .collect();
        assert_eq!(named, TARGETS);
        for t in TARGETS {
            let seeds = fs::read_dir(fuzz_dir().join("seeds").join(t))
                .unwrap()
                .count();
            assert!(seeds > 0, "{t} has no seeds");
        }
    }
}
