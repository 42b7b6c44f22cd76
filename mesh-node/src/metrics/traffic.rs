//! Traffic management at the source: connect attempts and retries, outlier ejections, route
//! decisions (endpoints ejected now are read at scrape time, in `collect.rs`). Refusals by a connection limit or a rate limit are failed connections and are
//! counted with their reason in `connections.rs`.
//!
//! Labels name workloads and Services, never pods, so the series grow with the pairs and
//! Services a node carries.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::{MetricsError, PREFIX};

pub struct TrafficMetrics {
    attempts: IntCounterVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    routes: IntCounterVec,
    not_http: IntCounterVec,
    http_retries: IntCounterVec,
    http_budget: IntCounterVec,
    http_timeouts: IntCounterVec,
}

/// One connect attempt's labels: who tried which Service's endpoint.
pub struct Attempt<'a> {
    pub source_workload: &'a str,
    pub source_namespace: &'a str,
    pub service: &'a str,
    pub destination_workload: &'a str,
    pub destination_namespace: &'a str,
}

impl TrafficMetrics {
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<_, MetricsError> {
            let c = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            attempts: counter(
                "connect_attempts_total",
                "Connect attempts to Service endpoints, by the endpoint's workload and result \
                 (ok, or failed: refused, timed out or no tunnel, before the destination \
                 accepted).",
                &[
                    "source_workload",
                    "source_namespace",
                    "destination_service",
                    "destination_workload",
                    "destination_namespace",
                    "result",
                ],
            )?,
            retries: counter(
                "connect_retries_total",
                "Connect attempts after a connection's first (connect.maxAttempts).",
                &["source_workload", "source_namespace", "destination_service"],
            )?,
            ejections: counter(
                "service_ejections_total",
                "Times an endpoint of the Service port was ejected by outlier detection.",
                &["service", "port"],
            )?,
            routes: counter(
                "route_decisions_total",
                "New connections (requests, on ports that declare HTTP) a ServiceRoute sent to \
                 each backend Service.",
                &["route", "service", "backend"],
            )?,
            not_http: counter(
                "http_not_http_total",
                "Application connections to a port declared HTTP (appProtocol) that did not \
                 speak it; each was closed.",
                &["destination_service", "protocol"],
            )?,
            http_retries: counter(
                "http_retries_total",
                "Requests to a Service port that declares HTTP tried again (TrafficPolicy \
                 http.retries).",
                &["destination_service"],
            )?,
            http_budget: counter(
                "http_retry_budget_exhausted_total",
                "Failed requests that would have been tried again but for the retry budget; \
                 the failure went to the client.",
                &["destination_service"],
            )?,
            http_timeouts: counter(
                "http_request_timeouts_total",
                "Requests the mesh answered 504 because requestTimeout passed.",
                &["destination_service"],
            )?,
        })
    }

    pub fn attempt(&self, a: &Attempt<'_>, ok: bool) {
        self.attempts
            .with_label_values(&[
                a.source_workload,
                a.source_namespace,
                a.service,
                a.destination_workload,
                a.destination_namespace,
                if ok { "ok" } else { "failed" },
            ])
            .inc();
    }

    pub fn retry(&self, source_workload: &str, source_namespace: &str, service: &str) {
        self.retries
            .with_label_values(&[source_workload, source_namespace, service])
            .inc();
    }

    /// The counter of one Service port's ejections (the gauge of those out now is read at
    /// scrape time: `collect.rs`).
    pub fn ejection_series(&self, service: &str, port: u16) -> IntCounter {
        self.ejections
            .with_label_values(&[service, &port.to_string()])
    }

    pub fn not_http(&self, service: &str, protocol: &str) {
        self.not_http.with_label_values(&[service, protocol]).inc();
    }

    pub fn http_retry(&self, service: &str) {
        self.http_retries.with_label_values(&[service]).inc();
    }

    pub fn http_budget_exhausted(&self, service: &str) {
        self.http_budget.with_label_values(&[service]).inc();
    }

    pub fn http_timed_out(&self, service: &str) {
        self.http_timeouts.with_label_values(&[service]).inc();
    }

    pub fn routed(&self, route: &str, service: &str, backend: &str) {
        self.routes
            .with_label_values(&[route, service, backend])
            .inc();
    }
}
