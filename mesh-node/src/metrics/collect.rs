//! Figures read when Prometheus scrapes, from the state that owns them: nothing here keeps a
//! second copy that could drift. Families whose label sets come and go (certificates of
//! workloads that left, say) are rebuilt on each scrape.

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use mesh_ebpf_common::Counter;
use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};
use tokio::sync::watch;

use super::PREFIX;
use crate::{
    admin::Status,
    capture::Capture,
    control::MeshView,
    identity::SvidStore,
    proxy::{authz::Authz, ProxyStats},
};

/// The node's state-backed figures.
pub struct NodeCollector {
    capture: Arc<Capture>,
    authz: Arc<Authz>,
    svids: Arc<SvidStore>,
    stats: Arc<ProxyStats>,
    status: watch::Receiver<Status>,
    view: watch::Receiver<Arc<MeshView>>,
    ebpf: IntCounterVec,
    ebpf_entries: IntGaugeVec,
    decisions: IntCounterVec,
    closed_by_policy: IntCounter,
    tunnels: IntCounterVec,
    cert_expiry: GaugeVec,
    root_expiry: GaugeVec,
    config_age: GaugeVec,
    config_version: IntGauge,
    config_results: IntCounterVec,
    cp_connected: IntGauge,
    enrolled: IntGauge,
    workers: IntGauge,
    tasks: IntGauge,
    /// Scrapes rebuild the families: one at a time.
    scrape: Mutex<()>,
}

impl NodeCollector {
    pub fn new(
        capture: Arc<Capture>,
        authz: Arc<Authz>,
        svids: Arc<SvidStore>,
        stats: Arc<ProxyStats>,
        status: watch::Receiver<Status>,
        view: watch::Receiver<Arc<MeshView>>,
    ) -> Result<Self, prometheus::Error> {
        let name = |n: &str| format!("{PREFIX}_{n}");
        Ok(Self {
            capture,
            authz,
            svids,
            stats,
            status,
            view,
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
            tunnels: IntCounterVec::new(
                Opts::new(
                    name("tunnels_total"),
                    "Tunnels by direction and outcome: out (opened, reused, failed), in \
                     (accepted, refused), QUIC connections (out, in).",
                ),
                &["direction", "outcome"],
            )?,
            cert_expiry: GaugeVec::new(
                Opts::new(
                    name("certificate_expiry_timestamp_seconds"),
                    "When each workload certificate this node holds expires (Unix seconds).",
                ),
                &["identity", "serial"],
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
        match self.capture.counters() {
            Ok(counters) => {
                for c in Counter::ALL {
                    set_counter(&self.ebpf, &[c.name()], counters.get(c));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the eBPF counters for metrics"),
        }
        let (by_cookie, by_tuple) = self.capture.orig_dst_entries();
        let entries = [
            ("orig_dst_by_cookie", by_cookie),
            ("orig_dst_by_tuple", by_tuple),
            ("fast_deny", self.capture.fast_deny_entries()),
        ];
        for (map, n) in entries {
            self.ebpf_entries
                .with_label_values(&[map])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }

        self.decisions.reset();
        for ((policy, rule, action, mode), n) in self.authz.decision_counts() {
            let (action, mode) = (action.to_string(), mode.to_string());
            set_counter(&self.decisions, &[&policy, &rule, &action, &mode], n);
        }
        self.closed_by_policy.reset();
        self.closed_by_policy.inc_by(self.authz.closed_by_policy());

        let s = &self.stats;
        for (direction, outcome, v) in [
            ("out", "opened", &s.tunnels_out),
            ("out", "reused", &s.tunnels_reused),
            ("out", "failed", &s.tunnels_out_failed),
            ("in", "accepted", &s.tunnels_in),
            ("in", "refused", &s.tunnels_in_refused),
            ("quic_out", "opened", &s.quic_connections_out),
            ("quic_in", "accepted", &s.quic_connections_in),
        ] {
            set_counter(
                &self.tunnels,
                &[direction, outcome],
                v.load(Ordering::Relaxed),
            );
        }

        self.cert_expiry.reset();
        for svid in self.svids.all() {
            self.cert_expiry
                .with_label_values(&[&svid.identity, &svid.serial])
                .set(unix_seconds(svid.not_after));
        }

        self.root_expiry.reset();
        let view = self.view.borrow().clone();
        for der in &view.trust_roots {
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

        let status = self.status.borrow().clone();
        self.config_age.reset();
        if let Some(at) = status.config_updated_at {
            let age = SystemTime::now()
                .duration_since(at)
                .map_or(0.0, |d| d.as_secs_f64());
            self.config_age.with_label_values::<&str>(&[]).set(age);
        }
        self.config_version
            .set(i64::try_from(status.config_version).unwrap_or(i64::MAX));
        set_counter(&self.config_results, &["ok"], status.config_applied);
        set_counter(&self.config_results, &["error"], status.config_errors);
        self.cp_connected.set(i64::from(status.cp_connected));
        self.enrolled
            .set(i64::try_from(status.enrolled).unwrap_or(i64::MAX));
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
    fn families(&self) -> [&dyn Collector; 14] {
        [
            &self.ebpf,
            &self.ebpf_entries,
            &self.decisions,
            &self.closed_by_policy,
            &self.tunnels,
            &self.cert_expiry,
            &self.root_expiry,
            &self.workers,
            &self.tasks,
            &self.config_age,
            &self.config_version,
            &self.config_results,
            &self.cp_connected,
            &self.enrolled,
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
