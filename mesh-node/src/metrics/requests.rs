//! Request metrics of Service ports that declare HTTP (`appProtocol`), reported by the
//! source's node: it is the one that sees requests (the destination's node sees the upstream
//! connections that carry them, as any connection). Per workload pair with the connection
//! families' labels (`reporter` is always `source`), plus the request's `method` and the
//! response's `code` class:
//!
//! - `mycel_http_requests_total`: requests, counted when their response ends (or when they
//!   end without one: `code="cancelled"`, the client went away before the response's
//!   headers; one that leaves during the body counts under the response's code, and its log
//!   line says `complete: false`).
//! - `mycel_http_response_headers_seconds`: from the request's headers to the response's.
//! - `mycel_http_request_duration_seconds`: from the request's headers to the end of the
//!   response's body.
//!
//! The buckets run from 100 µs to 30 s, each at most 1.6 times the one below, so a quantile
//! read from them (`histogram_quantile`) is off by less than that step. Methods outside the
//! standard ones count as `other`, so a client that invents methods cannot grow the series.
//!
//! With `--access-log requests` (or `all`) each request gets a line of its own
//! ([`RequestEntry`]), written from the same call that counts it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use super::{connections::label_names, MetricsError, Pair, Reporter, PREFIX};
use crate::access_log::{self, AccessLog, RequestEntry};

/// The `method` label's values; anything else is `other`.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];
const OTHER_METHOD: usize = METHODS.len();

/// The `code` label's values, by the status's first digit; and a request with no response.
const CODES: [&str; 10] = [
    "cancelled",
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "6xx",
    "7xx",
    "8xx",
    "9xx",
];

/// Bucket bounds in seconds: 1, 1.6, 2.5, 4, 6.3 per decade from 100 µs, then 30 s.
fn buckets() -> Vec<f64> {
    let mut b = Vec::new();
    for exp in -4..=1 {
        for m in [1.0, 1.6, 2.5, 4.0, 6.3] {
            let v: f64 = m * 10f64.powi(exp);
            if v < 30.0 {
                // Rounded so the exposition's `le` reads as written, not 0.00016000000000000001.
                b.push((v * 1e6).round() / 1e6);
            }
        }
    }
    b.push(30.0);
    b
}

pub struct RequestMetrics {
    access_log: Arc<AccessLog>,
    pod_labels: bool,
    requests: IntCounterVec,
    headers: HistogramVec,
    duration: HistogramVec,
    /// The series of each (pair, method, code) seen, looked up once.
    /// By pair, then by (method, code): a request's lookup borrows its pair rather than
    /// copying its ten strings into a key.
    series: Mutex<HashMap<Pair, OfPair>>,
}

/// A request's (method, code) label indexes.
type Class = (usize, usize);

/// One pair's series, by class: a handful, so a list.
type OfPair = Vec<(Class, Arc<Series>)>;

struct Series {
    requests: IntCounter,
    headers: Histogram,
    duration: Histogram,
}

impl RequestMetrics {
    pub fn register(
        registry: &Registry,
        access_log: Arc<AccessLog>,
        pod_labels: bool,
    ) -> Result<Arc<Self>, MetricsError> {
        let mut labels = label_names(pod_labels);
        labels.extend(["method", "code"]);
        let requests = IntCounterVec::new(
            Opts::new(
                format!("{PREFIX}_http_requests_total"),
                "Requests to Service ports that declare HTTP, by method and response code class \
                 (cancelled: the client went away before the response's headers), counted when \
                 the response ends.",
            ),
            &labels,
        )?;
        registry.register(Box::new(requests.clone()))?;
        let histogram = |name: &str, help: &str| -> Result<HistogramVec, MetricsError> {
            let h = HistogramVec::new(
                HistogramOpts::new(format!("{PREFIX}_{name}"), help).buckets(buckets()),
                &labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        Ok(Arc::new(Self {
            access_log,
            pod_labels,
            requests,
            headers: histogram(
                "http_response_headers_seconds",
                "Time from a request's headers to its response's headers, tries and the \
                 mesh's waits between them included.",
            )?,
            duration: histogram(
                "http_request_duration_seconds",
                "Time from a request's headers to the end of its response's body.",
            )?,
            series: Mutex::default(),
        }))
    }

    /// A request whose headers just arrived from the application at `client`, of `pair`
    /// (its source; the destination is filled in as it is tried).
    pub fn start<B>(
        self: &Arc<Self>,
        pair: Pair,
        client: SocketAddr,
        req: &hyper::Request<B>,
    ) -> Request {
        let (method, uri) = (req.method(), req.uri());
        let method_class = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(OTHER_METHOD);
        // Only what the log needs, and only when it is written.
        let log = self.access_log.wants_requests().then(|| {
            Box::new(LogFields {
                client,
                method: bounded(method.as_str(), 32),
                // HTTP/2's `:authority`, or HTTP/1.1's Host header (its requests name only a
                // path).
                authority: bounded(
                    uri.authority().map_or_else(
                        || {
                            req.headers()
                                .get(hyper::header::HOST)
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or("")
                        },
                        |a| a.as_str(),
                    ),
                    256,
                ),
                // The path without its query, which often carries tokens.
                path: bounded(uri.path(), 1024),
                version: version_name(req.version()),
                endpoint: None,
                backend: String::new(),
                mesh_error: String::new(),
                attempts: 0,
                response_bytes: 0,
            })
        });
        Request {
            metrics: self.clone(),
            start: Instant::now(),
            method_class,
            pair,
            status: None,
            headers_after: None,
            complete: false,
            log,
        }
    }

    fn series(&self, pair: &Pair, method: usize, code: usize) -> Arc<Series> {
        let mut all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let known = all
            .get(pair)
            .and_then(|of_pair| of_pair.iter().find(|(k, _)| *k == (method, code)));
        if let Some((_, s)) = known {
            return s.clone();
        }
        let mut labels = pair.labels(Reporter::Source, self.pod_labels);
        labels.push(METHODS.get(method).copied().unwrap_or("other").to_owned());
        labels.push(CODES[code].to_owned());
        let values: Vec<&str> = labels.iter().map(String::as_str).collect();
        let s = Arc::new(Series {
            requests: self.requests.with_label_values(&values),
            headers: self.headers.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
        });
        all.entry(pair.clone())
            .or_default()
            .push(((method, code), s.clone()));
        s
    }
}

/// What the access log says of a request beyond its pair and figures.
struct LogFields {
    client: SocketAddr,
    method: String,
    authority: String,
    path: String,
    version: &'static str,
    endpoint: Option<SocketAddr>,
    backend: String,
    mesh_error: String,
    attempts: u32,
    response_bytes: u64,
}

/// One request in flight: counted, observed and logged once, when its response ends or when
/// it is dropped before that.
pub struct Request {
    metrics: Arc<RequestMetrics>,
    start: Instant,
    method_class: usize,
    pair: Pair,
    status: Option<u16>,
    headers_after: Option<Duration>,
    complete: bool,
    /// Present when requests are logged.
    log: Option<Box<LogFields>>,
}

impl Request {
    /// The request goes to the endpoint of `pair` at `endpoint` (each try says where; the
    /// last one is what is reported).
    pub fn tried(&mut self, destination: impl FnOnce(&mut Pair), endpoint: SocketAddr) {
        destination(&mut self.pair);
        if let Some(log) = &mut self.log {
            log.endpoint = Some(endpoint);
            log.attempts += 1;
        }
    }

    /// The backend Service a ServiceRoute picked (logged).
    pub fn routed(&mut self, backend: &str) {
        if let Some(log) = &mut self.log {
            log.backend = backend.to_owned();
        }
    }

    /// The response's headers are on their way to the client; `mesh_error` is the reason
    /// the mesh gave when it answered itself.
    pub fn answered(&mut self, status: u16, mesh_error: Option<&str>) {
        let took = self.start.elapsed();
        self.status = Some(status);
        self.headers_after = Some(took);
        if let (Some(log), Some(why)) = (&mut self.log, mesh_error) {
            log.mesh_error = bounded(why, 512);
        }
    }

    /// The response's body went to its end.
    pub fn complete(&mut self) {
        self.complete = true;
    }

    /// `n` bytes of the response's body went to the client.
    pub fn body(&mut self, n: usize) {
        if let Some(log) = &mut self.log {
            log.response_bytes += n as u64;
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        let code = self.status.map_or(0, |s| usize::from(s / 100).clamp(1, 9));
        let m = &self.metrics;
        let series = m.series(&self.pair, self.method_class, code);
        series.requests.inc();
        if let Some(h) = self.headers_after {
            series.headers.observe(h.as_secs_f64());
        }
        series.duration.observe(took.as_secs_f64());
        if let Some(log) = &self.log {
            m.access_log.write(&RequestEntry {
                time: access_log::rfc3339(SystemTime::now()),
                kind: "request",
                reporter: Reporter::Source.as_str(),
                ends: self.pair.ends(Some(log.client), log.endpoint),
                backend: &log.backend,
                method: &log.method,
                authority: &log.authority,
                path: &log.path,
                version: log.version,
                status: self.status.unwrap_or(0),
                code: CODES[code],
                complete: self.complete,
                mesh_error: &log.mesh_error,
                attempts: log.attempts,
                response_bytes: log.response_bytes,
                headers_seconds: self.headers_after.map(access_log::seconds),
                duration_seconds: access_log::seconds(took),
            });
        }
    }
}

fn version_name(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_09 => "HTTP/0.9",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_11 => "HTTP/1.1",
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_3 => "HTTP/3",
        _ => "",
    }
}

/// At most `max` bytes of `s`, cut at a character boundary: what a client sends is logged,
/// never an unbounded amount of it.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> Pair {
        Pair {
            source_workload: "web".into(),
            source_namespace: "ns".into(),
            destination_service: "pay".into(),
            ..Pair::default()
        }
    }

    #[test]
    fn buckets_span_100us_to_30s_in_steps_of_at_most_1_6() {
        let b = buckets();
        assert_eq!(b.first(), Some(&0.0001));
        assert_eq!(b.last(), Some(&30.0));
        for w in b.windows(2) {
            assert!(w[1] > w[0] && w[1] / w[0] <= 1.6 + 1e-9, "{w:?}");
        }
    }

    #[test]
    fn a_request_counts_once_by_method_and_code_class_and_a_dropped_one_as_cancelled() {
        let registry = Registry::new();
        let m = RequestMetrics::register(&registry, Arc::new(AccessLog::off()), false).unwrap();
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let get = hyper::Request::get("/x?token=secret").body(()).unwrap();
        let mut r = m.start(pair(), client, &get);
        r.tried(|p| p.destination_workload = "pay".into(), client);
        r.answered(503, Some("no endpoint"));
        drop(r);
        let invented = hyper::Method::from_bytes(b"BREW").unwrap();
        let brew = hyper::Request::builder()
            .method(invented)
            .uri("/x")
            .version(hyper::Version::HTTP_2)
            .body(())
            .unwrap();
        drop(m.start(pair(), client, &brew));
        let total = "mycel_http_requests_total";
        assert_eq!(
            crate::metrics::samples(
                &registry,
                total,
                &[
                    ("method", "GET"),
                    ("code", "5xx"),
                    ("destination_workload", "pay")
                ]
            ),
            [1.0]
        );
        assert_eq!(
            crate::metrics::samples(
                &registry,
                total,
                &[("method", "other"), ("code", "cancelled")]
            ),
            [1.0]
        );
        assert_eq!(
            crate::metrics::samples(
                &registry,
                "mycel_http_response_headers_seconds",
                &[("code", "5xx")]
            ),
            [1.0]
        );
        // No headers went out for the cancelled one; its duration still counts.
        assert_eq!(
            crate::metrics::samples(
                &registry,
                "mycel_http_response_headers_seconds",
                &[("code", "cancelled")]
            ),
            [0.0]
        );
        assert_eq!(
            crate::metrics::samples(
                &registry,
                "mycel_http_request_duration_seconds",
                &[("code", "cancelled")]
            ),
            [1.0]
        );
    }

    #[test]
    fn what_a_client_sends_is_logged_bounded() {
        assert_eq!(bounded("abc", 8), "abc");
        assert_eq!(bounded("aé", 2), "a");
        assert_eq!(bounded(&"x".repeat(5000), 1024).len(), 1024);
    }
}
