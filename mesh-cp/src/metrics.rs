//! The control plane's Prometheus metrics, served on `--metrics-listen` at `/metrics`.
//!
//! Counted where things happen: config pushes to nodes and how long each took to be
//! acknowledged, acknowledgements and rejections, certificates issued and refused (by a
//! bounded reason), config reloads rejected. Read when scraped: nodes connected, the config
//! version in force, whether the files on disk are in force, the CA's expiry.

use std::sync::Mutex;

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

const PREFIX: &str = "mycel_cp";

/// Why a certificate was refused; a closed set so the label stays bounded.
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    /// The requested identity is not a SPIFFE ID.
    BadIdentity,
    /// The identity is outside the mesh's trust domain.
    TrustDomain,
    /// No workload with that identity is placed on the asking node.
    NotPlaced,
    /// The CSR could not be signed (malformed, wrong key type).
    BadCsr,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::BadIdentity => "bad_identity",
            Refusal::TrustDomain => "trust_domain",
            Refusal::NotPlaced => "not_placed",
            Refusal::BadCsr => "bad_csr",
        }
    }
}

/// What a config stream sent a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Everything it holds: a new stream, or one too far behind to be sent changes.
    Snapshot,
    /// The first message to a node that reconnected with a version this control plane
    /// still knows: what changed since (maybe nothing).
    Resume,
    /// What changed since the previous message.
    Update,
}

impl Push {
    pub fn as_str(self) -> &'static str {
        match self {
            Push::Snapshot => "snapshot",
            Push::Resume => "resume",
            Push::Update => "update",
        }
    }
}

pub struct CpMetrics {
    registry: Registry,
    pushes: IntCounterVec,
    resources_sent: IntCounterVec,
    acks: IntCounterVec,
    push_latency: Histogram,
    issued: IntCounter,
    refused: IntCounterVec,
    config_errors: IntCounter,
    node_refusals: IntCounterVec,
    on_demand: IntCounterVec,
}

impl CpMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let name = |n: &str| format!("{PREFIX}_{n}");
        let pushes = IntCounterVec::new(
            Opts::new(
                name("config_pushes_total"),
                "Config versions sent to nodes: snapshot (everything, when a stream starts), \
                 resume (what changed since the version a reconnecting node holds), update \
                 (what changed since the stream's previous message).",
            ),
            &["kind"],
        )?;
        let resources_sent = IntCounterVec::new(
            Opts::new(
                name("config_resources_sent_total"),
                "Resources and removals sent to nodes, by the kind of message that carried them.",
            ),
            &["kind"],
        )?;
        for kind in [Push::Snapshot, Push::Resume, Push::Update] {
            pushes.with_label_values(&[kind.as_str()]);
            resources_sent.with_label_values(&[kind.as_str()]);
        }
        let acks = IntCounterVec::new(
            Opts::new(
                name("config_acks_total"),
                "Node answers to config updates: ok (applied) or rejected.",
            ),
            &["result"],
        )?;
        let push_latency = Histogram::with_opts(
            HistogramOpts::new(
                name("config_push_duration_seconds"),
                "From sending a config version to a node to the node acknowledging it (applied, \
                 kernel fast-deny entries included).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
        )?;
        let issued = IntCounter::new(
            name("certificates_issued_total"),
            "Workload certificates signed.",
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                name("certificates_refused_total"),
                "Certificate requests refused, by reason.",
            ),
            &["reason"],
        )?;
        let config_errors = IntCounter::new(
            name("config_errors_total"),
            "Config dir changes rejected (the last good config stays in force).",
        )?;
        let node_refusals = IntCounterVec::new(
            Opts::new(
                name("node_requests_refused_total"),
                "Node requests refused before any work: unauthenticated, permission_denied, \
                 unavailable (cannot check now), throttled (too many attempts from the \
                 address), too_many_streams.",
            ),
            &["reason"],
        )?;
        for r in [
            "unauthenticated",
            "permission_denied",
            "unavailable",
            "throttled",
            "too_many_streams",
        ] {
            node_refusals.with_label_values(&[r]);
        }
        let on_demand = IntCounterVec::new(
            Opts::new(
                name("on_demand_lookups_total"),
                "What nodes that take workloads on demand asked for: found (a workload, sent), \
                 absent (a key or an address no workload has), refused (a malformed or \
                 over-limit request, which ends the node's stream).",
            ),
            &["answer"],
        )?;
        for a in ["found", "absent", "refused"] {
            on_demand.with_label_values(&[a]);
        }
        for c in [
            Box::new(pushes.clone()) as Box<dyn Collector>,
            Box::new(on_demand.clone()),
            Box::new(resources_sent.clone()),
            Box::new(acks.clone()),
            Box::new(push_latency.clone()),
            Box::new(issued.clone()),
            Box::new(refused.clone()),
            Box::new(config_errors.clone()),
            Box::new(node_refusals.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            pushes,
            resources_sent,
            acks,
            push_latency,
            issued,
            refused,
            config_errors,
            node_refusals,
            on_demand,
        })
    }

    /// Answers to on-demand requests: `found` workloads sent, `absent` keys and addresses.
    pub fn on_demand(&self, found: usize, absent: usize) {
        self.on_demand
            .with_label_values(&["found"])
            .inc_by(found as u64);
        self.on_demand
            .with_label_values(&["absent"])
            .inc_by(absent as u64);
    }

    /// An on-demand request refused (its stream ends).
    pub fn on_demand_refused(&self) {
        self.on_demand.with_label_values(&["refused"]).inc();
    }

    /// A node request refused before any work; `reason` is one of the family's labels.
    pub fn node_refused(&self, reason: &str) {
        self.node_refusals.with_label_values(&[reason]).inc();
    }

    /// Adds the figures `read` returns when scraped; `None` (the state is gone) reports none.
    pub fn watch(
        &self,
        read: impl Fn() -> Option<Figures> + Send + Sync + 'static,
    ) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(StateCollector::new(Box::new(read))?))
    }

    /// A version sent to a node, carrying `resources` resources and removals.
    pub fn pushed(&self, kind: Push, resources: usize) {
        self.pushes.with_label_values(&[kind.as_str()]).inc();
        self.resources_sent
            .with_label_values(&[kind.as_str()])
            .inc_by(resources as u64);
    }

    /// A node acknowledged (`ok`) or rejected a version sent `seconds` ago.
    pub fn acked(&self, ok: bool, seconds: Option<f64>) {
        let result = if ok { "ok" } else { "rejected" };
        self.acks.with_label_values(&[result]).inc();
        if let Some(s) = seconds {
            self.push_latency.observe(s);
        }
    }

    pub fn issued(&self) {
        self.issued.inc();
    }

    pub fn refused(&self, why: Refusal) {
        self.refused.with_label_values(&[why.as_str()]).inc();
    }

    pub fn config_rejected(&self) {
        self.config_errors.inc();
    }

    pub fn render(&self) -> Result<String, String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

/// What the state says at scrape time. Plain numbers, so that this module needs no state
/// type: the state owns the metrics and hands them a reader (`Shared::watch_metrics`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Nodes with a config stream open.
    pub nodes_connected: usize,
    pub config_version: u64,
    /// Whether the config source as it is now is in force (no rejected change).
    pub config_in_force: bool,
    /// Whether the config store (etcd) answers; `None` without one.
    pub store_reachable: Option<bool>,
    /// Whether this replica leads; `None` where replicas elect no leader.
    pub leader: Option<bool>,
    /// When the CA's root certificate expires, in Unix seconds (0 when unreadable).
    pub ca_expiry: f64,
}

type Reader = Box<dyn Fn() -> Option<Figures> + Send + Sync>;

struct StateCollector {
    read: Reader,
    nodes: IntGauge,
    version: IntGauge,
    config_in_force: IntGauge,
    store_reachable: IntGauge,
    leader: IntGauge,
    ca_expiry: Gauge,
    scrape: Mutex<()>,
}

impl StateCollector {
    fn new(read: Reader) -> Result<Self, prometheus::Error> {
        let name = |n: &str| format!("{PREFIX}_{n}");
        Ok(Self {
            read,
            nodes: IntGauge::new(name("nodes_connected"), "Nodes with a config stream open.")?,
            version: IntGauge::new(name("config_version"), "The config version in force.")?,
            config_in_force: IntGauge::new(
                name("config_dir_in_force"),
                "1 when the config dir as it is on disk is in force, 0 when a change was rejected.",
            )?,
            store_reachable: IntGauge::new(
                name("store_reachable"),
                "1 while the config store (etcd) answers, 0 while it does not (the last config stays in force); only with --etcd-endpoints.",
            )?,
            leader: IntGauge::new(
                name("leader"),
                "1 while this replica leads the others (it makes the CA when there is none, and in Kubernetes writes the policies' status), 0 otherwise; only where replicas elect a leader (etcd, Kubernetes).",
            )?,
            ca_expiry: Gauge::new(
                name("ca_expiry_timestamp_seconds"),
                "When the CA's root certificate expires (Unix seconds).",
            )?,
            scrape: Mutex::new(()),
        })
    }
}

impl StateCollector {
    /// Every family: what `desc` and `collect` both walk.
    fn families(&self) -> [&dyn Collector; 6] {
        [
            &self.nodes,
            &self.version,
            &self.config_in_force,
            &self.store_reachable,
            &self.leader,
            &self.ca_expiry,
        ]
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.families().into_iter().flat_map(|f| f.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let Some(figures) = (self.read)() else {
            return Vec::new();
        };
        self.nodes
            .set(i64::try_from(figures.nodes_connected).unwrap_or(i64::MAX));
        self.version
            .set(i64::try_from(figures.config_version).unwrap_or(i64::MAX));
        self.config_in_force.set(i64::from(figures.config_in_force));
        self.ca_expiry.set(figures.ca_expiry);
        if let Some(up) = figures.store_reachable {
            self.store_reachable.set(i64::from(up));
        }
        if let Some(leads) = figures.leader {
            self.leader.set(i64::from(leads));
        }
        // Without a store, or an election, there is nothing to say of one.
        let unsaid = |f: &&dyn Collector| {
            (figures.store_reachable.is_none() && std::ptr::addr_eq(*f, &self.store_reachable))
                || (figures.leader.is_none() && std::ptr::addr_eq(*f, &self.leader))
        };
        self.families()
            .into_iter()
            .filter(|f| !unsaid(f))
            .flat_map(|f| f.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_show_the_figures_read_and_none_once_the_state_is_gone() {
        let metrics = CpMetrics::new().unwrap();
        let figures = Figures {
            nodes_connected: 2,
            config_version: 7,
            config_in_force: false,
            store_reachable: None,
            leader: None,
            ca_expiry: 1.5e9,
        };
        metrics.watch(move || Some(figures)).unwrap();
        let text = metrics.render().unwrap();
        for line in [
            "mycel_cp_nodes_connected 2",
            "mycel_cp_config_version 7",
            "mycel_cp_config_dir_in_force 0",
            "mycel_cp_ca_expiry_timestamp_seconds 1500000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }

        assert!(
            !text.contains("mycel_cp_store_reachable"),
            "no store, no line"
        );
        let stored = CpMetrics::new().unwrap();
        stored
            .watch(move || {
                Some(Figures {
                    store_reachable: Some(false),
                    leader: Some(true),
                    ..figures
                })
            })
            .unwrap();
        let text = stored.render().unwrap();
        assert!(
            text.lines().any(|l| l == "mycel_cp_store_reachable 0"),
            "{text}"
        );

        let gone = CpMetrics::new().unwrap();
        gone.watch(|| None).unwrap();
        assert!(!gone.render().unwrap().contains("mycel_cp_nodes_connected"));
    }
}
