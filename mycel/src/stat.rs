//! `mycel stat`: traffic per workload pair (`mesh_telemetry::traffic`), from the nodes'
//! `/metrics` (two scrapes `--interval` apart; the nodes named, or every node mesh-cp knows
//! the metrics endpoint of) or from Prometheus (rates over the last minute).

use std::time::Duration;

use anyhow::Context as _;
use mesh_telemetry::traffic::{self, Pair};

use crate::{status, table};

#[derive(clap::Args)]
pub struct Args {
    /// A node's metrics address, host:port (its mesh-node --metrics-listen); repeat for each
    /// node. Rates are over --interval between two scrapes of each. Without --node or
    /// --prometheus: every connected node, where mesh-cp says its metrics are.
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

pub fn run(cp: &str, args: &Args) -> anyhow::Result<Vec<Pair>> {
    if let Some(addr) = &args.prometheus {
        return Ok(traffic::prometheus::pairs(addr)?);
    }
    let nodes = if args.node.is_empty() {
        // The metrics endpoints mesh-cp knows: each node's port, at the address its stream
        // comes from.
        let s = status::fetch(cp).context(
            "no --node or --prometheus given, and mesh-cp cannot say where the nodes' metrics are",
        )?;
        let known: Vec<String> = s
            .nodes
            .values()
            .filter(|n| n.streams > 0)
            .filter_map(|n| n.metrics.clone())
            .collect();
        if known.is_empty() {
            anyhow::bail!(
                "no connected node has told mesh-cp its metrics port: give --node or --prometheus"
            );
        }
        known
    } else {
        args.node.clone()
    };
    Ok(traffic::scrape::pairs(
        &nodes,
        Duration::from_secs_f64(args.interval),
    )?)
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
