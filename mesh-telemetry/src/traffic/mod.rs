//! Traffic per workload pair, as the source's node reports it: each connection once (a pair
//! whose source is outside the mesh has no source node and is not here). Connections and bytes
//! per second, failures, connections open, and on ports that declare HTTP requests per second
//! and their duration's p50/p95/p99.
//!
//! From one scrape of the nodes' `/metrics` to the next ([`scrape`]), or from Prometheus
//! ([`prometheus`], rates over the last minute).

mod histogram;
pub mod prometheus;
pub mod scrape;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::exposition::Labels;

/// One workload pair: `namespace/workload` at each end, the workload being the application
/// (a pod's `app.kubernetes.io/name` or `app` label, else its own name), as the metrics say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// What traffic is keyed by: source and destination, `namespace/workload`.
pub type PairKey = (String, String);

/// The pair a series is about, from its labels.
pub fn pair_of(labels: &Labels) -> Option<PairKey> {
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
