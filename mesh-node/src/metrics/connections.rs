//! Connection metrics, labelled by workload pair and by the end that reports them.
//!
//! Each connection through the proxy is reported by the node of its source
//! (`reporter="source"`) and by the node of its destination (`reporter="destination"`); a
//! connection between two pods of one node is reported twice by that node. Labels name
//! workloads, never pods or addresses, so a node's series grow with the workload pairs it
//! carries, not with its connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::{MetricsError, PREFIX};
use crate::access_log::{self, AccessLog, Entry};
use crate::transport::Transport;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Who talks to whom. Empty fields are unknown: the workload of a destination outside the
/// mesh, the service (only the source knows which one it asked for), a source whose address
/// is not a mesh workload.
///
/// A workload, in the labels, is what a pod's `app.kubernetes.io/name` or `app` label names
/// (the object's own name when it has neither; `proxy/labels.rs` fills them in): every
/// replica of an application shares its series. The pod (`source_pod`, `destination_pod`:
/// the workload object's name) is in the labels only with `--metrics-pod-labels`, and always
/// in the access log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pair {
    pub source_workload: String,
    pub source_namespace: String,
    pub source_identity: String,
    pub source_pod: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_identity: String,
    pub destination_pod: String,
    pub destination_service: String,
    pub destination_port: u16,
}

impl Pair {
    /// Label values in the order of [`label_names`].
    pub(super) fn labels(&self, reporter: Reporter, pods: bool) -> Vec<String> {
        let mut labels = vec![
            reporter.as_str().to_owned(),
            self.source_workload.clone(),
            self.source_namespace.clone(),
            self.source_identity.clone(),
            self.destination_workload.clone(),
            self.destination_namespace.clone(),
            self.destination_identity.clone(),
            self.destination_service.clone(),
            self.destination_port.to_string(),
        ];
        if pods {
            labels.extend([self.source_pod.clone(), self.destination_pod.clone()]);
        }
        labels
    }
}

impl Pair {
    /// The pair as the access log names it, with the two ends' addresses.
    pub(super) fn ends(
        &self,
        source_address: Option<SocketAddr>,
        destination_address: Option<SocketAddr>,
    ) -> access_log::Ends<'_> {
        let named = access_log::named;
        access_log::Ends {
            source_workload: named(&self.source_namespace, &self.source_workload),
            source_pod: named(&self.source_namespace, &self.source_pod),
            source_identity: &self.source_identity,
            source_address,
            destination_workload: named(&self.destination_namespace, &self.destination_workload),
            destination_pod: named(&self.destination_namespace, &self.destination_pod),
            destination_identity: &self.destination_identity,
            destination_address,
            destination_service: &self.destination_service,
            destination_port: self.destination_port,
        }
    }
}

/// What the access log says of a connection beyond its pair.
#[derive(Clone, Debug, Default)]
pub struct Details {
    pub connection_id: u64,
    pub source_address: Option<SocketAddr>,
    pub destination_address: Option<SocketAddr>,
    pub transport: Transport,
    /// The deciding policy and rule, where this node decided.
    pub policy: String,
    pub rule: String,
    /// Connect attempts it took (0 where this node made none: the destination's report).
    pub attempts: u32,
    /// The backend Service a ServiceRoute picked, `namespace/name`.
    pub backend: String,
}

/// The labels of the per-pair families, with the pod labels when `pods`.
pub(super) fn label_names(pods: bool) -> Vec<&'static str> {
    let mut names = vec![
        "reporter",
        "source_workload",
        "source_namespace",
        "source_identity",
        "destination_workload",
        "destination_namespace",
        "destination_identity",
        "destination_service",
        "destination_port",
    ];
    if pods {
        names.extend(["source_pod", "destination_pod"]);
    }
    names
}

/// Why a connection failed. A closed set, so the label stays bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// A policy denies it.
    Denied,
    /// The application at the destination could not be connected to.
    UpstreamConnect,
    /// The tunnel could not be made: connect, TLS or QUIC handshake, header exchange, timeout.
    Tunnel,
    /// The destination refused the tunnel for a reason other than policy.
    Refused,
    /// No endpoint of the service could be reached.
    NoEndpoint,
    /// This node lacks what the connection needs: a certificate, the trust bundle, its view.
    NotReady,
    /// The original destination of a redirected connection was not recorded.
    NoOriginalDestination,
    /// Established, then ended by an error on either side (both sides were reset).
    Reset,
    /// Established, then closed because a policy change denies it.
    ClosedByPolicy,
    /// A limit on connections or handshakes refused it, at either end.
    Overloaded,
    /// Established, then closed because the trust root its tunnel's peer chains to was
    /// withdrawn from the bundle.
    TrustWithdrawn,
    /// The source node's `connectionLimits.maxConnections` for the Service refused it.
    ConnectionLimit,
    /// The source node's `connectionLimits.maxPendingConnects` for the Service refused it.
    PendingLimit,
    /// The destination's `rateLimit` refused it.
    RateLimited,
    /// Established, then closed after `idleTimeout` without a byte either way.
    IdleTimeout,
    /// Established, then closed at its `maxConnectionDuration`.
    MaxDuration,
    /// On demand: the control plane did not say in time who has the destination (or the
    /// source) address, so the connection was refused rather than let around the mesh.
    Unresolved,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Denied => "denied",
            FailReason::UpstreamConnect => "upstream_connect",
            FailReason::Tunnel => "tunnel",
            FailReason::Refused => "refused",
            FailReason::NoEndpoint => "no_endpoint",
            FailReason::NotReady => "not_ready",
            FailReason::NoOriginalDestination => "no_original_destination",
            FailReason::Reset => "reset",
            FailReason::ClosedByPolicy => "closed_by_policy",
            FailReason::Overloaded => "overloaded",
            FailReason::TrustWithdrawn => "trust_withdrawn",
            FailReason::ConnectionLimit => "connection_limit",
            FailReason::PendingLimit => "pending_limit",
            FailReason::RateLimited => "rate_limited",
            FailReason::IdleTimeout => "idle_timeout",
            FailReason::MaxDuration => "max_duration",
            FailReason::Unresolved => "unresolved",
        }
    }
}

/// What became of a plaintext connection from outside the mesh (PERMISSIVE mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plaintext {
    Admitted,
    /// A policy denies it.
    Denied,
    /// A limit, a destination that is not the pod's application, or the application's
    /// connect failing.
    Refused,
}

impl Plaintext {
    const ALL: [Plaintext; 3] = [Plaintext::Admitted, Plaintext::Denied, Plaintext::Refused];

    fn as_str(self) -> &'static str {
        match self {
            Plaintext::Admitted => "admitted",
            Plaintext::Denied => "denied",
            Plaintext::Refused => "refused",
        }
    }
}

/// The connection families. One per daemon, shared by every connection.
pub struct ConnectionMetrics {
    access_log: Arc<AccessLog>,
    /// Whether the per-pair families carry the pods' names (`--metrics-pod-labels`).
    pod_labels: bool,
    /// The series of each (reporter, pair) seen, looked up once: an open connection holds a
    /// reference, not its own copy of nine label values. Bounded as the series themselves are.
    series: Mutex<HashMap<(Reporter, Pair), Arc<PairSeries>>>,
    opened: IntCounterVec,
    closed: IntCounterVec,
    failed: IntCounterVec,
    open: IntGaugeVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    duration: HistogramVec,
    connect: HistogramVec,
    /// Indexed as [`Plaintext::ALL`] is.
    plaintext: [IntCounter; 3],
    /// Deliveries whose application saw the pod's own address instead of the source's.
    own_address: IntCounter,
}

impl ConnectionMetrics {
    /// Registers the families; with `pod_labels`, the per-pair ones carry the pods' names.
    pub fn register(
        registry: &Registry,
        access_log: Arc<AccessLog>,
        pod_labels: bool,
    ) -> Result<Arc<Self>, MetricsError> {
        let pair_labels = label_names(pod_labels);
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<_, MetricsError> {
            let c = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let mut failed_labels = pair_labels.clone();
        failed_labels.push("reason");
        let open = IntGaugeVec::new(
            Opts::new(
                format!("{PREFIX}_tcp_connections_open"),
                "Connections established and not yet closed.",
            ),
            &pair_labels,
        )?;
        registry.register(Box::new(open.clone()))?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                format!("{PREFIX}_tcp_connection_duration_seconds"),
                "How long established connections lasted, observed when they close.",
            )
            .buckets(vec![
                0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
            ]),
            &pair_labels,
        )?;
        registry.register(Box::new(duration.clone()))?;
        let connect = HistogramVec::new(
            HistogramOpts::new(
                format!("{PREFIX}_tcp_connect_duration_seconds"),
                "Time from accepting an application's connection to its destination answering: \
                 TCP connect, tunnel handshake and header exchange, by transport and session.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0,
            ]),
            &["transport", "session"],
        )?;
        registry.register(Box::new(connect.clone()))?;
        let own_address = IntCounter::new(
            format!("{PREFIX}_delivered_from_own_address_total"),
            "Connections delivered to an application from its own pod address because one \
             from the source's address could not be made (no source port left, an address the \
             kernel refused); pods without return routing are in \
             mycel_enrolled_without_client_address instead.",
        )?;
        registry.register(Box::new(own_address.clone()))?;
        let plaintext = counter(
            "plaintext_connections_total",
            "Plaintext connections to this node's pods from outside the mesh (PERMISSIVE mode), \
             by outcome: admitted, denied (by policy), refused (a limit, a destination that is \
             not the application, or its connect failing).",
            &["outcome"],
        )?;
        Ok(Arc::new(Self {
            access_log,
            pod_labels,
            series: Mutex::default(),
            opened: counter(
                "tcp_connections_opened_total",
                "Connections established: the destination's application accepted them.",
                &pair_labels,
            )?,
            closed: counter(
                "tcp_connections_closed_total",
                "Established connections that ended, whichever way (those ended by an error are \
                 also counted as failed).",
                &pair_labels,
            )?,
            failed: counter(
                "tcp_connections_failed_total",
                "Connections that failed, before being established or by an error after, by reason.",
                &failed_labels,
            )?,
            open,
            sent: counter(
                "tcp_sent_bytes_total",
                "Application bytes from source to destination, counted as they are relayed.",
                &pair_labels,
            )?,
            received: counter(
                "tcp_received_bytes_total",
                "Application bytes from destination to source, counted as they are relayed.",
                &pair_labels,
            )?,
            duration,
            connect,
            plaintext: Plaintext::ALL.map(|o| plaintext.with_label_values(&[o.as_str()])),
            own_address,
        }))
    }

    /// An established connection: counted open until the returned value drops, then logged.
    /// Boxed: it lives in the connection's task for as long as the connection.
    pub fn opened(
        self: &Arc<Self>,
        reporter: Reporter,
        pair: &Pair,
        details: Details,
    ) -> Box<Connection> {
        let series = self.series(reporter, pair);
        series.opened.inc();
        series.open.inc();
        let totals: Arc<[AtomicU64; 2]> = Arc::default();
        let sent = Flow::new(series.sent.clone(), &totals, 0);
        let received = Flow::new(series.received.clone(), &totals, 1);
        // The relay counts relative to the application socket it holds: at the source that
        // is the client, at the destination the server.
        let traffic = match reporter {
            Reporter::Source => Traffic {
                from_app: sent,
                to_app: received,
            },
            Reporter::Destination => Traffic {
                from_app: received,
                to_app: sent,
            },
        };
        Box::new(Connection {
            metrics: self.clone(),
            series,
            details,
            traffic,
            totals,
            start: Instant::now(),
            failure: None,
        })
    }

    fn series(&self, reporter: Reporter, pair: &Pair) -> Arc<PairSeries> {
        let mut all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = all.get(&(reporter, pair.clone())) {
            return s.clone();
        }
        let labels = pair.labels(reporter, self.pod_labels);
        let values: Vec<&str> = labels.iter().map(String::as_str).collect();
        let s = Arc::new(PairSeries {
            opened: self.opened.with_label_values(&values),
            closed: self.closed.with_label_values(&values),
            open: self.open.with_label_values(&values),
            sent: self.sent.with_label_values(&values),
            received: self.received.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
            reporter,
            pair: pair.clone(),
            labels,
        });
        all.insert((reporter, pair.clone()), s.clone());
        s
    }

    /// A connection that failed before it was established; `detail` says why, for people.
    pub fn failed(
        &self,
        reporter: Reporter,
        pair: &Pair,
        reason: FailReason,
        details: &Details,
        detail: &str,
    ) {
        let labels = pair.labels(reporter, self.pod_labels);
        let mut values: Vec<&str> = labels.iter().map(String::as_str).collect();
        values.push(reason.as_str());
        self.failed.with_label_values(&values).inc();
        if self.access_log.wants(reason == FailReason::Denied) {
            let verdict = if reason == FailReason::Denied {
                "denied"
            } else {
                "failed"
            };
            self.access_log.write(&entry(
                reporter,
                pair,
                details,
                ([0, 0], Duration::ZERO),
                verdict,
                reason.as_str(),
                detail,
            ));
        }
    }

    pub fn plaintext(&self, outcome: Plaintext) {
        self.plaintext[outcome as usize].inc();
    }

    /// A delivery that could not be made from its source's address and came from the pod's.
    pub fn delivered_from_own_address(&self) {
        self.own_address.inc();
    }

    /// Time an outbound connection took to reach its destination by `transport`, on a
    /// tunnel session or QUIC connection that was `reused` or new.
    pub fn connected(&self, transport: Transport, reused: bool, took: Duration) {
        let session = match (transport, reused) {
            (Transport::Tls | Transport::Quic, true) => "reused",
            (Transport::Tls | Transport::Quic, false) => "new",
            _ => "none",
        };
        self.connect
            .with_label_values(&[transport.as_str(), session])
            .observe(took.as_secs_f64());
    }
}

/// The access log line of a connection of `pair`, reported by `reporter`.
fn entry<'a>(
    reporter: Reporter,
    pair: &'a Pair,
    d: &'a Details,
    ([sent, received], took): ([u64; 2], Duration),
    verdict: &'a str,
    close_reason: &'a str,
    detail: &'a str,
) -> Entry<'a> {
    Entry {
        time: access_log::rfc3339(SystemTime::now()),
        kind: "connection",
        reporter: reporter.as_str(),
        connection_id: d.connection_id,
        ends: pair.ends(d.source_address, d.destination_address),
        transport: d.transport.as_str(),
        bytes_sent: sent,
        bytes_received: received,
        duration_seconds: access_log::seconds(took),
        verdict,
        policy: &d.policy,
        rule: &d.rule,
        attempts: d.attempts,
        backend: &d.backend,
        close_reason,
        detail,
    }
}

/// One direction's byte counters: the pair's series and the connection's own total (two of
/// each for a relay that serves both ends of a connection on one node).
#[derive(Clone, Default)]
pub struct Flow {
    parts: Vec<(IntCounter, Arc<[AtomicU64; 2]>, usize)>,
}

impl Flow {
    fn new(counter: IntCounter, totals: &Arc<[AtomicU64; 2]>, index: usize) -> Self {
        Self {
            parts: vec![(counter, totals.clone(), index)],
        }
    }

    /// Counts `n` bytes moved.
    pub fn add(&self, n: usize) {
        for (counter, totals, i) in &self.parts {
            counter.inc_by(n as u64);
            totals[*i].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn and(mut self, other: &Flow) -> Self {
        self.parts.extend(other.parts.iter().cloned());
        self
    }
}

/// Byte counters of one relay, by direction relative to the application socket it holds.
/// A connection between two pods of one node carries both reporters' counters.
#[derive(Clone, Default)]
pub struct Traffic {
    pub from_app: Flow,
    pub to_app: Flow,
}

impl Traffic {
    /// The same counters for a relay that holds the other end's application socket (the
    /// destination's counters on a relay that holds the client).
    pub fn swapped(&self) -> Self {
        Self {
            from_app: self.to_app.clone(),
            to_app: self.from_app.clone(),
        }
    }

    /// Both connections' counters, for a relay that serves both ends (same node).
    pub fn and(self, other: &Traffic) -> Self {
        Self {
            from_app: self.from_app.and(&other.from_app),
            to_app: self.to_app.and(&other.to_app),
        }
    }
}

/// An established connection's metrics; closes it in the metrics when dropped.
pub struct Connection {
    metrics: Arc<ConnectionMetrics>,
    series: Arc<PairSeries>,
    details: Details,
    pub traffic: Traffic,
    /// This connection's bytes sent and received (source → destination, and back).
    totals: Arc<[AtomicU64; 2]>,
    start: Instant,
    failure: Option<FailReason>,
}

/// The series of one (reporter, pair).
struct PairSeries {
    reporter: Reporter,
    pair: Pair,
    /// Label values, as [`Pair::labels`] orders them.
    labels: Vec<String>,
    opened: IntCounter,
    closed: IntCounter,
    open: IntGauge,
    sent: IntCounter,
    received: IntCounter,
    duration: Histogram,
}

impl Connection {
    /// Marks the connection as ended by `reason` (it still counts as closed).
    pub fn fail(&mut self, reason: FailReason) {
        self.failure = Some(reason);
    }

    /// This connection's byte counts (source to destination, and back), as they move.
    pub fn totals(&self) -> Arc<[AtomicU64; 2]> {
        self.totals.clone()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let series = &self.series;
        series.open.dec();
        series.closed.inc();
        series.duration.observe(self.start.elapsed().as_secs_f64());
        if let Some(reason) = self.failure {
            let mut values: Vec<&str> = series.labels.iter().map(String::as_str).collect();
            values.push(reason.as_str());
            self.metrics.failed.with_label_values(&values).inc();
        }
        let denied = self.failure == Some(FailReason::ClosedByPolicy);
        if self.metrics.access_log.wants(denied) {
            let bytes = self.totals.each_ref().map(|t| t.load(Ordering::Relaxed));
            let series = &self.series;
            let (verdict, close) = match self.failure {
                None => ("allowed", "closed"),
                Some(FailReason::ClosedByPolicy) => ("denied", FailReason::ClosedByPolicy.as_str()),
                Some(reason) => ("allowed", reason.as_str()),
            };
            self.metrics.access_log.write(&entry(
                series.reporter,
                &series.pair,
                &self.details,
                (bytes, self.start.elapsed()),
                verdict,
                close,
                "",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> Pair {
        Pair {
            source_workload: "a".into(),
            source_namespace: "ns".into(),
            destination_workload: "b".into(),
            destination_namespace: "ns".into(),
            destination_port: 80,
            ..Pair::default()
        }
    }

    fn value(registry: &Registry, name: &str, reporter: &str) -> f64 {
        crate::metrics::samples(registry, name, &[("reporter", reporter)])
            .iter()
            .sum()
    }

    #[test]
    fn a_connection_counts_bytes_live_and_closes_once() {
        let registry = Registry::new();
        let m = ConnectionMetrics::register(&registry, Arc::new(AccessLog::off()), false).unwrap();
        let mut source = m.opened(Reporter::Source, &pair(), Details::default());
        let destination = m.opened(Reporter::Destination, &pair(), Details::default());
        // The source's relay holds the client: from the app is sent. The destination's relay
        // holds the server: from the app is received.
        source.traffic.from_app.add(100);
        destination.traffic.from_app.add(7);
        assert_eq!(
            value(&registry, "mycel_tcp_sent_bytes_total", "source"),
            100.0
        );
        assert_eq!(
            value(&registry, "mycel_tcp_received_bytes_total", "destination"),
            7.0
        );
        assert_eq!(
            value(&registry, "mycel_tcp_connections_open", "source"),
            1.0
        );
        source.fail(FailReason::Reset);
        drop(source);
        drop(destination);
        for reporter in ["source", "destination"] {
            assert_eq!(
                value(&registry, "mycel_tcp_connections_open", reporter),
                0.0
            );
            assert_eq!(
                value(&registry, "mycel_tcp_connections_closed_total", reporter),
                1.0
            );
        }
        assert_eq!(
            value(&registry, "mycel_tcp_connections_failed_total", "source"),
            1.0
        );
        assert_eq!(
            value(
                &registry,
                "mycel_tcp_connections_failed_total",
                "destination"
            ),
            0.0
        );
    }

    #[test]
    fn registering_twice_is_an_error() {
        let registry = Registry::new();
        ConnectionMetrics::register(&registry, Arc::new(AccessLog::off()), false).unwrap();
        assert!(ConnectionMetrics::register(&registry, Arc::new(AccessLog::off()), false).is_err());
    }
}
