//! `mycel check`: findings, each with what to do. Without `--pre` it asks mesh-cp whether the
//! mesh is in order ([`mesh`]); with `--pre` it checks this host before mesh-node runs on it
//! ([`host`]).

pub mod host;
pub mod mesh;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use crate::table;

#[derive(clap::Args)]
pub struct Args {
    /// Check this host before mesh-node runs on it (kernel, cgroup v2, BPF and bpffs,
    /// capabilities, the node's ports, the clock) instead of the running mesh.
    #[arg(long)]
    pub pre: bool,
    /// --pre: the cgroup mesh-node will attach to (its run --cgroup) [default: the root of
    /// the cgroup2 mount in /proc/mounts].
    #[arg(long, requires = "pre")]
    pub cgroup: Option<PathBuf>,
    /// --pre: the bpffs mesh-node will pin in (its run --bpffs).
    #[arg(long, requires = "pre", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// --pre: mesh-node's admin address (its run --admin-listen), which must be free.
    #[arg(long, requires = "pre", default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,
    /// --pre: mesh-node's metrics address (its run --metrics-listen), which must be free.
    #[arg(long, requires = "pre", default_value = "0.0.0.0:15020")]
    pub metrics_listen: SocketAddr,
    /// --pre: a pod's network namespace (e.g. /run/netns/api) whose ports mesh-node will
    /// listen on when it enrolls the pod (15001, 15006 and 15008 over TCP, 15008 over UDP):
    /// they must be free there. Repeat for several pods.
    #[arg(long = "netns", requires = "pre")]
    pub netns: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Works now, but needs attention.
    Warn,
    Fail,
}

/// One thing checked: what, how it went, what was found and, unless it is fine, what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub outcome: Outcome,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            outcome: Outcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn warn(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            outcome: Outcome::Warn,
            ..Self::fail(check, detail, fix)
        }
    }

    pub fn failed(&self) -> bool {
        self.outcome == Outcome::Fail
    }
}

pub fn run(cp: &str, args: &Args) -> Vec<Finding> {
    if args.pre {
        host::check(args)
    } else {
        mesh::check(cp)
    }
}

/// One line per finding, the fix indented below it, and a count at the end.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let mark = match f.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        };
        out += &format!("{mark}  {}: {}\n", f.check, f.detail);
        if let Some(fix) = &f.fix {
            out += &format!("      fix: {fix}\n");
        }
    }
    let count = |o| findings.iter().filter(|f| f.outcome == o).count();
    out += &format!(
        "\n{} checks: {} passed, {} warned, {} failed\n",
        findings.len(),
        count(Outcome::Ok),
        count(Outcome::Warn),
        count(Outcome::Fail)
    );
    out
}

/// How soon a time is, for a finding.
pub(crate) fn when(t: std::time::SystemTime) -> String {
    format!("{} ({})", mesh_daemon::time::rfc3339(t), table::from_now(t))
}
