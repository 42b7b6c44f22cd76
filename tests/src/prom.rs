//! Prometheus in tests: reading expositions (samples by name and labels), `promtool`'s
//! checks, and a real Prometheus server (Debian's package) on loopback that scrapes the
//! nodes and answers PromQL.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{
    daemon::Daemon,
    mesh::{free_port, http_get},
};

pub use mesh_telemetry::exposition::{Exposition, Labels};

/// `promtool check metrics` on `text`: Ok, or what promtool said.
pub fn promtool_check(text: &str) -> io::Result<Result<(), String>> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::other(format!(
                "cannot run promtool (apt-get install prometheus): {e}"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// A Prometheus server scraping `targets` every second, its data in a scratch directory;
/// stopped and removed on drop.
pub struct PrometheusServer {
    pub addr: SocketAddr,
    daemon: Daemon,
}

/// The job names the dashboard's queries select nodes and the control plane by.
pub const NODE_JOB: &str = "mycel-node";
pub const CP_JOB: &str = "mycel-cp";

impl PrometheusServer {
    /// Starts `prometheus` scraping each `(job, address)` at `/metrics`, and waits until it is
    /// ready.
    pub fn start(prefix: &str, targets: &[(&str, SocketAddr)]) -> io::Result<Self> {
        // A test may run two servers at once; two in one data directory corrupt each other's
        // head chunks (Prometheus panics "expected newly cut file to have sequence:offset").
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-prometheus-{n}"));
        fs::create_dir_all(&dir)?;
        let mut jobs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (job, addr) in targets {
            jobs.entry(job).or_default().push(format!("'{addr}'"));
        }
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addrs) in &jobs {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                addrs.join(", ")
            ));
        }
        let config_file = dir.join("prometheus.yml");
        fs::write(&config_file, config)?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log_file = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_file)?)
            .spawn()
            .map_err(|e| {
                io::Error::other(format!(
                    "cannot run prometheus (apt-get install prometheus): {e}"
                ))
            })?;
        let mut daemon = Daemon::new("prometheus", child, dir, log_file);
        daemon.wait_until(Duration::from_secs(30), "prometheus ready", || {
            http_get(addr, "/-/ready").ok()
        })?;
        Ok(Self { addr, daemon })
    }

    /// An instant query: each series' labels and value.
    pub fn query(&self, promql: &str) -> io::Result<Vec<(Labels, f64)>> {
        query(self.addr, promql)
    }

    /// Waits until `promql` returns a result for which `done` holds; returns the result.
    pub fn wait_for(
        &mut self,
        promql: &str,
        done: impl Fn(&[(Labels, f64)]) -> bool,
    ) -> io::Result<Vec<(Labels, f64)>> {
        let addr = self.addr;
        let mut last = String::new();
        let outcome = self.daemon.wait_until(Duration::from_secs(30), promql, || {
            match query(addr, promql) {
                Ok(r) if done(&r) => Some(r),
                other => {
                    last = format!("{other:?}");
                    None
                }
            }
        });
        outcome.map_err(|e| io::Error::other(format!("{e}; last answer: {last}")))
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// `GET /api/v1/query` on the server at `addr`.
fn query(addr: SocketAddr, promql: &str) -> io::Result<Vec<(Labels, f64)>> {
    mesh_telemetry::prometheus::query(&addr.to_string(), promql).map_err(io::Error::other)
}

/// The dashboard shipped in `deploy/grafana/`, as (panel title, query) pairs, with Grafana's
/// `$__rate_interval` set to what the tests' one-second scrapes allow.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/mycel-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            out.push((title.to_owned(), expr.replace("$__rate_interval", "30s")));
        }
    }
    out
}

/// The `target`th query of the dashboard panel titled `title`.
pub fn dashboard_query(title: &str, target: usize) -> String {
    dashboard_queries()
        .into_iter()
        .filter(|(t, _)| t == title)
        .nth(target)
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("no query {target} in panel {title:?}"))
}

/// The value of the one series of `result` whose labels include `want`.
pub fn value_of(result: &[(Labels, f64)], want: &[(&str, &str)]) -> Option<f64> {
    let mut matching = result.iter().filter(|(labels, _)| {
        want.iter()
            .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
    });
    let (_, v) = matching.next()?;
    matching.next().is_none().then_some(*v)
}

/// Waits until every query of the dashboard panels titled `titles` returns data from a
/// Prometheus that scrapes `nodes`: the panels' metrics exist and the PromQL is valid.
pub fn assert_panels_answer(prefix: &str, nodes: &[SocketAddr], titles: &[&str]) {
    let targets: Vec<(&str, SocketAddr)> = nodes.iter().map(|a| (NODE_JOB, *a)).collect();
    let mut prom = PrometheusServer::start(prefix, &targets).expect("prometheus");
    for title in titles {
        let queries: Vec<String> = dashboard_queries()
            .into_iter()
            .filter(|(t, _)| t == title)
            .map(|(_, q)| q)
            .collect();
        assert!(!queries.is_empty(), "no dashboard panel {title:?}");
        for q in queries {
            prom.wait_for(&q, |r| !r.is_empty())
                .unwrap_or_else(|e| panic!("{title}: {e}\n{}", prom.log()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_servers_of_one_test_keep_their_data_apart() {
        let prefix = format!("mycel-prom2-{}", std::process::id());
        let a = PrometheusServer::start(&prefix, &[]).expect("first prometheus");
        let b = PrometheusServer::start(&prefix, &[]).expect("second prometheus");
        assert_ne!(a.daemon.dir, b.daemon.dir);
        for server in [&a, &b] {
            server
                .query("vector(1)")
                .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
        }
    }
}
