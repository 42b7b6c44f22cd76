//! `mycel stat --node`: each node's `/metrics`, scraped twice; rates are the difference over
//! the time between the two.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_cp::client;

use super::{histogram, pair_of, Pair, PairKey};
use crate::exposition::Exposition;

/// What the nodes' counters say of one pair at one moment, summed over the nodes.
#[derive(Debug, Clone, Default)]
struct Counters {
    opened: f64,
    failed: BTreeMap<String, f64>,
    bytes: f64,
    open: f64,
    requests: f64,
    /// Request duration buckets: upper bound (as written) to cumulative count.
    buckets: BTreeMap<String, f64>,
}

type Scrape = BTreeMap<PairKey, Counters>;

pub fn pairs(nodes: &[String], interval: Duration) -> anyhow::Result<Vec<Pair>> {
    let first = scrape(nodes)?;
    let started = Instant::now();
    std::thread::sleep(interval);
    let second = scrape(nodes)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(second
        .iter()
        .map(|(key, now)| {
            let before = first.get(key).cloned().unwrap_or_default();
            // A node that restarted between the scrapes counts from zero again.
            let rate = |now: f64, before: f64| (now - before).max(0.0) / seconds;
            let failed_now: f64 = now.failed.values().sum();
            let failed_before: f64 = before.failed.values().sum();
            let window = window_buckets(&now.buckets, &before.buckets);
            let q = |q| histogram::quantile(q, &window);
            Pair {
                source: key.0.clone(),
                destination: key.1.clone(),
                connections_per_second: rate(now.opened, before.opened),
                bytes_per_second: rate(now.bytes, before.bytes),
                failures_per_second: rate(failed_now, failed_before),
                connections_open: now.open,
                connections_total: now.opened,
                failures_total: failed_now,
                failure_reasons: now.failed.clone(),
                requests_per_second: rate(now.requests, before.requests),
                request_p50: q(0.5),
                request_p95: q(0.95),
                request_p99: q(0.99),
            }
        })
        .collect())
}

fn scrape(nodes: &[String]) -> anyhow::Result<Scrape> {
    let mut out = Scrape::new();
    for node in nodes {
        let text = client::get_ok(node, "/metrics")?;
        let e = Exposition::parse(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{node}/metrics is not Prometheus's text format"))?;
        add(&mut out, &e);
    }
    Ok(out)
}

/// Adds one node's source-side series to `out`.
fn add(out: &mut Scrape, e: &Exposition) {
    let source = [("reporter", "source")];
    let each = |name: &str| {
        e.matching(name, &source)
            .filter_map(|(l, v)| Some((pair_of(l)?, l, v)))
    };
    for (key, _, v) in each("mycel_tcp_connections_opened_total") {
        out.entry(key).or_default().opened += v;
    }
    for (key, l, v) in each("mycel_tcp_connections_failed_total") {
        let reason = l.get("reason").cloned().unwrap_or_default();
        *out.entry(key)
            .or_default()
            .failed
            .entry(reason)
            .or_default() += v;
    }
    for name in [
        "mycel_tcp_sent_bytes_total",
        "mycel_tcp_received_bytes_total",
    ] {
        for (key, _, v) in each(name) {
            out.entry(key).or_default().bytes += v;
        }
    }
    for (key, _, v) in each("mycel_tcp_connections_open") {
        out.entry(key).or_default().open += v;
    }
    for (key, _, v) in each("mycel_http_requests_total") {
        out.entry(key).or_default().requests += v;
    }
    for (key, l, v) in each("mycel_http_request_duration_seconds_bucket") {
        let le = l.get("le").cloned().unwrap_or_default();
        *out.entry(key).or_default().buckets.entry(le).or_default() += v;
    }
}

/// The buckets of what was observed between two scrapes, sorted by upper bound.
fn window_buckets(now: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = now
        .iter()
        .filter_map(|(le, n)| {
            let before = before.get(le).copied().unwrap_or(0.0);
            Some((le.parse().ok()?, (n - before).max(0.0)))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}
