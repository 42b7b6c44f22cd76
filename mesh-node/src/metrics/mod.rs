//! The node's Prometheus metrics, served as text on `--metrics-listen` at `/metrics`.
//!
//! - `connections.rs`: per workload pair and reporter: connections opened, closed, failed (by
//!   a bounded reason), open, bytes each way (counted as they move, so long connections show
//!   live), durations; and the node's connect latency.
//! - `requests.rs`: per workload pair, on ports that declare HTTP: requests by method and
//!   code class, time to the response's headers and to its end.
//! - `tunnels.rs`: tunnels open, the connections each one carried, and what became of each.
//! - `traffic.rs`: connect attempts and retries, outlier ejections, route decisions.
//! - `collect.rs`: figures read when scraped from the state that already owns them: the eBPF
//!   counters, policy decisions, certificates, config freshness, the limits' counts.
//!
//! This is the node's one telemetry sink: an event is counted here once, and the access log
//! is written from the same calls. Labels come in as values (`Pair`, `Details`, `Outcome`);
//! the module knows nothing of the proxy's types.
//!
//! One [`Metrics`] per daemon owns the registry; a family registered twice is a startup error,
//! never a silently merged exposition.

pub mod collect;
pub mod connections;
pub mod requests;
pub mod traffic;
pub mod tunnels;

use std::sync::Arc;

use prometheus::{Encoder, Registry, TextEncoder};

pub use connections::{
    Connection, ConnectionMetrics, Details, FailReason, Flow, Pair, Plaintext, Reporter, Traffic,
};
pub use requests::{Request, RequestMetrics};
pub use traffic::TrafficMetrics;
pub use tunnels::{OpenTunnel, Outcome, TunnelMetrics};

/// Every metric name starts with this.
pub const PREFIX: &str = "mycel";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot register metric family: {0}")]
    Register(#[from] prometheus::Error),
    #[error("cannot encode the metrics: {0}")]
    Encode(String),
}

pub struct Metrics {
    registry: Registry,
    pub connections: Arc<ConnectionMetrics>,
    pub requests: Arc<RequestMetrics>,
    pub tunnels: Arc<TunnelMetrics>,
    pub traffic: Arc<TrafficMetrics>,
}

impl Metrics {
    /// The registry with the connection and request families, whose connections and requests
    /// `access_log` logs (with the pods' names as labels when `pod_labels`), and the tunnel
    /// and traffic families.
    pub fn new(
        access_log: Arc<crate::access_log::AccessLog>,
        pod_labels: bool,
    ) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let connections = ConnectionMetrics::register(&registry, access_log.clone(), pod_labels)?;
        let requests = RequestMetrics::register(&registry, access_log, pod_labels)?;
        let tunnels = Arc::new(TunnelMetrics::register(&registry)?);
        let traffic = Arc::new(TrafficMetrics::register(&registry)?);
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            connections,
            requests,
            tunnels,
            traffic,
        })
    }

    /// Adds a collector of state owned elsewhere.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> Result<(), MetricsError> {
        Ok(self.registry.register(c)?)
    }

    /// The exposition in Prometheus's text format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| MetricsError::Encode(e.to_string()))?;
        String::from_utf8(out).map_err(|e| MetricsError::Encode(e.to_string()))
    }
}

/// For tests: the value of each series of `name` whose labels include `want` (a counter's or
/// a gauge's; a histogram's count of observations).
#[cfg(test)]
pub(crate) fn samples(registry: &Registry, name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            want.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| {
            m.get_counter().get_value()
                + m.get_gauge().get_value()
                + m.get_histogram().get_sample_count() as f64
        })
        .collect()
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
