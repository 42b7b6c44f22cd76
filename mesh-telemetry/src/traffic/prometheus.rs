//! Traffic per pair from Prometheus: the same figures as PromQL over the last minute, from a
//! Prometheus server that scrapes the nodes.

use std::collections::BTreeMap;

use super::{pair_of, Pair, PairKey};
use crate::prometheus::{query, QueryError};

const BY: &str = "source_namespace, source_workload, destination_namespace, destination_workload";
const SOURCE: &str = "reporter=\"source\"";

pub fn pairs(addr: &str) -> Result<Vec<Pair>, QueryError> {
    let mut out: BTreeMap<PairKey, Pair> = BTreeMap::new();
    let mut take = |promql: String, set: &dyn Fn(&mut Pair, f64)| -> Result<(), QueryError> {
        for (labels, v) in query(addr, &promql)? {
            if let Some(key) = pair_of(&labels) {
                if v.is_finite() {
                    set(out.entry(key).or_default(), v);
                }
            }
        }
        Ok(())
    };
    let rate = |name: &str| format!("sum by ({BY}) (rate({name}{{{SOURCE}}}[1m]))");
    let total = |name: &str| format!("sum by ({BY}) ({name}{{{SOURCE}}})");
    take(rate("mycel_tcp_connections_opened_total"), &|p, v| {
        p.connections_per_second = v
    })?;
    take(rate("mycel_tcp_sent_bytes_total"), &|p, v| {
        p.bytes_per_second += v
    })?;
    take(rate("mycel_tcp_received_bytes_total"), &|p, v| {
        p.bytes_per_second += v
    })?;
    take(rate("mycel_tcp_connections_failed_total"), &|p, v| {
        p.failures_per_second = v
    })?;
    take(total("mycel_tcp_connections_open"), &|p, v| {
        p.connections_open = v
    })?;
    take(total("mycel_tcp_connections_opened_total"), &|p, v| {
        p.connections_total = v
    })?;
    take(total("mycel_tcp_connections_failed_total"), &|p, v| {
        p.failures_total = v
    })?;
    take(rate("mycel_http_requests_total"), &|p, v| {
        p.requests_per_second = v
    })?;
    for (q, set) in [
        (
            0.5,
            (|p: &mut Pair, v| p.request_p50 = Some(v)) as fn(&mut Pair, f64),
        ),
        (0.95, |p, v| p.request_p95 = Some(v)),
        (0.99, |p, v| p.request_p99 = Some(v)),
    ] {
        take(
            format!(
                "histogram_quantile({q}, sum by (le, {BY}) (rate(mycel_http_request_duration_seconds_bucket{{{SOURCE}}}[1m])))"
            ),
            &set,
        )?;
    }
    // Failures by reason, since start.
    for (labels, v) in query(
        addr,
        &format!("sum by (reason, {BY}) (mycel_tcp_connections_failed_total{{{SOURCE}}})"),
    )? {
        if let (Some(key), Some(reason)) = (pair_of(&labels), labels.get("reason")) {
            out.entry(key)
                .or_default()
                .failure_reasons
                .insert(reason.clone(), v);
        }
    }
    Ok(out
        .into_iter()
        .map(|((source, destination), p)| Pair {
            source,
            destination,
            ..p
        })
        .collect())
}
