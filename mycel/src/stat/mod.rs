//! `mycel stat`: traffic per workload pair, as the source's node reports it (each connection
//! once; a pair whose source is outside the mesh has no source node and is not shown):
//! connections and bytes per second, failures, connections open, and on ports that declare
//! HTTP requests per second and their duration's p50/p95/p99.
//!
//! From the nodes' `/metrics` ([`nodes`]: two scrapes `--interval` apart, rates over that
//! interval) or from Prometheus ([`prometheus`]: rates over the last minute).

mod histogram;
pub mod nodes;
pub mod prometheus;

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::table;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["node", "prometheus"])))]
pub struct Args {
    /// A node's metrics address, host:port (its mesh-node --metrics-listen); repeat for each
    /// node. Rates are over --interval between two scrapes of each.
    #[arg(long)]
    pub node: Vec<String>,
    /// A Prometheus server that scrapes the nodes (job mycel-node), host:port. Rates are over
    /// the last minute.
    #[arg(long, conflicts_with = "node")]
    pub prometheus: Option<String>,
    /// --node: seconds between the two scrapes.
    #[arg(long, default_value_t = 5.0, value_parser = mesh_daemon::cli::seconds(60))]
    pub interval: f64,
}

/// One workload pair: `namespace/workload` at each end.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Pair {
    pub source: String,
    pub destination: String,
    pub connections_per_second: f64,
    pub bytes_per_second: f64,
    pub failures_per_second: f64,
    pub connections_open: f64,
    /// Since each node's start.
    pub connections_total: f64,
    pub failures_total: f64,
    /// Failures since start, by reason.
    pub failure_reasons: BTreeMap<String, f64>,
    pub requests_per_second: f64,
    /// Request duration quantiles (seconds) over the window; none without requests in it.
    pub request_p50: Option<f64>,
    pub request_p95: Option<f64>,
    pub request_p99: Option<f64>,
}

/// What a report is keyed by: source and destination, `namespace/workload`.
pub type PairKey = (String, String);

pub fn run(args: &Args) -> anyhow::Result<Vec<Pair>> {
    match &args.prometheus {
        Some(addr) => Ok(prometheus::pairs(addr)?),
        None => nodes::pairs(&args.node, Duration::from_secs_f64(args.interval)),
    }
}

pub fn render(pairs: &[Pair]) -> String {
    if pairs.is_empty() {
        return "no traffic between workloads reported yet\n".into();
    }
    let rate = |v: f64| format!("{v:.1}");
    let quantile = |q: Option<f64>| q.map_or("-".to_owned(), |s| format!("{:.1}ms", s * 1e3));
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|p| {
            let reasons: Vec<String> = p
                .failure_reasons
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            vec![
                p.source.clone(),
                p.destination.clone(),
                rate(p.connections_per_second),
                bytes(p.bytes_per_second),
                rate(p.failures_per_second),
                p.connections_open.to_string(),
                p.connections_total.to_string(),
                if reasons.is_empty() {
                    "0".to_owned()
                } else {
                    reasons.join(", ")
                },
                if p.requests_per_second > 0.0 {
                    format!(
                        "{} / {} / {}",
                        quantile(p.request_p50),
                        quantile(p.request_p95),
                        quantile(p.request_p99)
                    )
                } else {
                    "-".to_owned()
                },
            ]
        })
        .collect();
    table::render(
        &[
            "SOURCE",
            "DESTINATION",
            "CONN/S",
            "BYTES/S",
            "FAIL/S",
            "OPEN",
            "CONNECTIONS",
            "FAILED (since start)",
            "REQUEST p50 / p95 / p99",
        ],
        &rows,
    )
}

fn bytes(per_second: f64) -> String {
    match per_second {
        b if b >= 1e6 => format!("{:.1}MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1}kB", b / 1e3),
        b => format!("{b:.0}B"),
    }
}

/// The pair a series is about, from its labels.
pub(crate) fn pair_of(labels: &crate::exposition::Labels) -> Option<PairKey> {
    let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or_default();
    let (sw, dw) = (get("source_workload"), get("destination_workload"));
    if sw.is_empty() || dw.is_empty() {
        return None;
    }
    Some((
        format!("{}/{sw}", get("source_namespace")),
        format!("{}/{dw}", get("destination_namespace")),
    ))
}
