//! Figures read when Prometheus scrapes, from the state that owns them: nothing here keeps a
//! second copy that could drift. Families whose label sets come and go (certificates of
//! workloads that left, say) are rebuilt on each scrape.
//!
//! This module knows the figures, not the types that hold them: the daemon hands the
//! collector a reader that fills a [`Figures`] (`admin::Parts::figures`).

use std::{
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use super::PREFIX;

/// What the node's state says at one scrape.
#[derive(Debug, Default)]
pub struct Figures {
    /// The eBPF programs' counters by event name, summed over CPUs; `None` when they cannot
    /// be read.
    pub ebpf_events: Option<Vec<(&'static str, u64)>>,
    /// Entries in the eBPF maps that fill up, by map.
    pub map_entries: Vec<(&'static str, usize)>,
    /// Policy decisions: (policy, rule, action, mode) and how many.
    pub decisions: Vec<([String; 4], u64)>,
    pub closed_by_policy: u64,
    /// Workload certificates held: identity, serial, expiry.
    pub certificates: Vec<(String, String, SystemTime)>,
    /// Certificates the control plane issued to this node, and requests that failed.
    pub certificates_issued: u64,
    pub certificate_errors: u64,
    /// The trust roots in force, DER.
    pub trust_roots: Vec<Vec<u8>>,
    pub config_updated_at: Option<SystemTime>,
    pub config_version: u64,
    pub config_applied: u64,
    pub config_errors: u64,
    pub cp_connected: bool,
    pub enrolled: usize,
    pub without_client_address: usize,
    /// Connections open to this node's pods, and tunnel handshakes in progress.
    pub inbound_open: u64,
    pub inbound_handshakes: u64,
    /// Endpoints ejected now (outlier detection), by Service and port.
    pub ejected: Vec<(String, u16, usize)>,
}

type Reader = Box<dyn Fn() -> Figures + Send + Sync>;

/// The node's state-backed figures.
pub struct NodeCollector {
    read: Reader,
    ebpf: IntCounterVec,
    ebpf_entries: IntGaugeVec,
    decisions: IntCounterVec,
    closed_by_policy: IntCounter,
    inbound_open: IntGauge,
    inbound_handshakes: IntGauge,
    cert_expiry: GaugeVec,
    cert_requests: IntCounterVec,
    root_expiry: GaugeVec,
    config_age: GaugeVec,
    config_version: IntGauge,
    config_results: IntCounterVec,
    cp_connected: IntGauge,
    enrolled: IntGauge,
    without_client_address: IntGauge,
    workers: IntGauge,
    tasks: IntGauge,
    ejected: IntGaugeVec,
    /// Scrapes rebuild the families: one at a time.
    scrape: Mutex<()>,
}

impl NodeCollector {
    pub fn new(
        read: impl Fn() -> Figures + Send + Sync + 'static,
    ) -> Result<Self, prometheus::Error> {
        let name = |n: &str| format!("{PREFIX}_{n}");
        Ok(Self {
            read: Box::new(read),
            ebpf: IntCounterVec::new(
                Opts::new(
                    name("ebpf_events_total"),
                    "Events the eBPF programs counted, summed over CPUs: redirected, skipped_*, \
                     map_full, orig_dst_lost, fast_denied, inbound_*.",
                ),
                &["event"],
            )?,
            ebpf_entries: IntGaugeVec::new(
                Opts::new(
                    name("ebpf_map_entries"),
                    "Entries in the eBPF maps that fill up: original destinations (by cookie and \
                     by tuple) and fast-deny rules.",
                ),
                &["map"],
            )?,
            decisions: IntCounterVec::new(
                Opts::new(
                    name("policy_decisions_total"),
                    "Policy decisions at this node's destinations by deciding policy and rule, \
                     action and mode (DryRun matches are counted, never enforced).",
                ),
                &["policy", "rule", "action", "mode"],
            )?,
            closed_by_policy: IntCounter::new(
                name("policy_closed_connections_total"),
                "Open connections closed because a policy change denies them.",
            )?,
            inbound_open: IntGauge::new(
                name("inbound_connections_open"),
                "Connections open to this node's pods (tunnelled and plaintext), counted against \
                 the limits.",
            )?,
            inbound_handshakes: IntGauge::new(
                name("inbound_handshakes"),
                "Tunnel handshakes to this node's pods in progress (until the first header).",
            )?,
            cert_expiry: GaugeVec::new(
                Opts::new(
                    name("certificate_expiry_timestamp_seconds"),
                    "When each workload certificate this node holds expires (Unix seconds).",
                ),
                &["identity", "serial"],
            )?,
            cert_requests: IntCounterVec::new(
                Opts::new(
                    name("certificate_requests_total"),
                    "Workload certificate requests to the control plane, by result (issued, \
                     error); an error is retried, and logged with its cause.",
                ),
                &["result"],
            )?,
            root_expiry: GaugeVec::new(
                Opts::new(
                    name("trust_root_expiry_timestamp_seconds"),
                    "When each trust root from the control plane expires (Unix seconds).",
                ),
                &["subject", "serial"],
            )?,
            config_age: GaugeVec::new(
                Opts::new(
                    name("config_age_seconds"),
                    "Seconds since the last config update from the control plane (or since the \
                     workloads file was applied, offline); absent before the first.",
                ),
                &[],
            )?,
            config_version: IntGauge::new(
                name("config_version"),
                "Version of the control plane's config in force (0 offline or before the first).",
            )?,
            config_results: IntCounterVec::new(
                Opts::new(
                    name("config_applies_total"),
                    "Workload sets applied, by result (ok, error).",
                ),
                &["result"],
            )?,
            cp_connected: IntGauge::new(
                name("control_plane_connected"),
                "1 while the config stream from the control plane is up.",
            )?,
            enrolled: IntGauge::new(name("enrolled_workloads"), "Workloads this node captures.")?,
            without_client_address: IntGauge::new(
                name("enrolled_without_client_address"),
                "Captured workloads whose applications see connections from their own pod address: their return routing could not be set up (the log says why).",
            )?,
            ejected: IntGaugeVec::new(
                Opts::new(
                    name("service_endpoints_ejected"),
                    "Endpoints of the Service port this node leaves out now (outlier detection).",
                ),
                &["service", "port"],
            )?,
            workers: IntGauge::new(
                name("runtime_workers"),
                "Worker threads of the daemon's async runtime.",
            )?,
            tasks: IntGauge::new(
                name("runtime_alive_tasks"),
                "Tasks alive in the daemon's async runtime (about one per open connection, plus \
                 the daemon's own).",
            )?,
            scrape: Mutex::new(()),
        })
    }

    fn update(&self) {
        let f = (self.read)();
        match &f.ebpf_events {
            Some(events) => {
                for (event, n) in events {
                    set_counter(&self.ebpf, &[event], *n);
                }
            }
            None => tracing::warn!("cannot read the eBPF counters for metrics"),
        }
        for (map, n) in &f.map_entries {
            self.ebpf_entries
                .with_label_values(&[map])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }

        self.decisions.reset();
        for ([policy, rule, action, mode], n) in &f.decisions {
            set_counter(&self.decisions, &[policy, rule, action, mode], *n);
        }
        self.closed_by_policy.reset();
        self.closed_by_policy.inc_by(f.closed_by_policy);
        self.inbound_open
            .set(i64::try_from(f.inbound_open).unwrap_or(i64::MAX));
        self.inbound_handshakes
            .set(i64::try_from(f.inbound_handshakes).unwrap_or(i64::MAX));

        self.cert_expiry.reset();
        for (identity, serial, not_after) in &f.certificates {
            self.cert_expiry
                .with_label_values(&[identity, serial])
                .set(unix_seconds(*not_after));
        }
        set_counter(&self.cert_requests, &["issued"], f.certificates_issued);
        set_counter(&self.cert_requests, &["error"], f.certificate_errors);

        self.root_expiry.reset();
        for der in &f.trust_roots {
            if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
                self.root_expiry
                    .with_label_values(&[cert.subject().to_string(), cert.raw_serial_as_string()])
                    .set(cert.validity().not_after.timestamp() as f64);
            }
        }
        // Scrapes are answered on the runtime; a handle is there unless called from outside.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let m = rt.metrics();
            self.workers
                .set(i64::try_from(m.num_workers()).unwrap_or(i64::MAX));
            self.tasks
                .set(i64::try_from(m.num_alive_tasks()).unwrap_or(i64::MAX));
        }

        self.config_age.reset();
        if let Some(at) = f.config_updated_at {
            let age = SystemTime::now()
                .duration_since(at)
                .map_or(0.0, |d| d.as_secs_f64());
            self.config_age.with_label_values::<&str>(&[]).set(age);
        }
        self.config_version
            .set(i64::try_from(f.config_version).unwrap_or(i64::MAX));
        set_counter(&self.config_results, &["ok"], f.config_applied);
        set_counter(&self.config_results, &["error"], f.config_errors);
        self.cp_connected.set(i64::from(f.cp_connected));
        self.enrolled
            .set(i64::try_from(f.enrolled).unwrap_or(i64::MAX));
        self.without_client_address
            .set(i64::try_from(f.without_client_address).unwrap_or(i64::MAX));
        self.ejected.reset();
        for (service, port, n) in &f.ejected {
            self.ejected
                .with_label_values(&[service.as_str(), &port.to_string()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}

/// Sets a counter child to a total kept elsewhere (which only grows).
fn set_counter(vec: &IntCounterVec, labels: &[&str], total: u64) {
    let c = vec.with_label_values(labels);
    c.reset();
    c.inc_by(total);
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl NodeCollector {
    /// Every family, in exposition order: what `desc` and `collect` both walk.
    fn families(&self) -> [&dyn Collector; 18] {
        [
            &self.ebpf,
            &self.ebpf_entries,
            &self.decisions,
            &self.closed_by_policy,
            &self.inbound_open,
            &self.inbound_handshakes,
            &self.cert_expiry,
            &self.cert_requests,
            &self.root_expiry,
            &self.workers,
            &self.tasks,
            &self.config_age,
            &self.config_version,
            &self.config_results,
            &self.cp_connected,
            &self.enrolled,
            &self.without_client_address,
            &self.ejected,
        ]
    }
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.families().into_iter().flat_map(|f| f.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.update();
        self.families()
            .into_iter()
            .flat_map(|f| f.collect())
            .collect()
    }
}
