//! Traffic management in the node proxy: which endpoint of a Service takes a new connection,
//! what this node may have open to it, and what outlives a directory rebuild to decide that.
//!
//! - this file: [`Traffic`], the owner of per-Service state at this node (endpoints' load,
//!   connect latency and outlier history; connections open and being made), and the order in
//!   which a connection tries endpoints;
//! - `outlier.rs`: one endpoint's failure streak and ejection;
//! - `budget.rs`: how many retries of requests (HTTP ports) a Service port may take;
//! - `rate.rs`: the destination side's rate limits;
//! - `expiry.rs`: idle timeout and maximum duration of established connections.
//!
//! The settings themselves (`mesh_model::traffic::Effective`) come with the directory; the
//! state here is keyed by Service and workload, so a config change keeps it.

pub mod budget;
pub mod expiry;
pub mod outlier;
pub mod rate;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_model::{
    spec::LoadBalancer,
    traffic::{ConnectionLimits, OutlierDetection},
};
use prometheus::IntCounter;

use super::directory::{Backend, Target};
use crate::{metrics::TrafficMetrics, workloads::WorkloadId};
use outlier::Outlier;

/// Weight of a new connect time in the latency average.
const EWMA_WEIGHT: f64 = 0.3;
/// Service ports with no connection for this long are forgotten once there are many, so
/// Services that come and go (test namespaces, say) do not stay for good.
const FORGET_AFTER: Duration = Duration::from_secs(600);
const PRUNE_ABOVE: usize = 1024;

/// Per-Service state of this node, by Service (`namespace/name`) and port: limits and
/// ejections are as narrow as the policies that set them, which may name ports.
pub struct Traffic {
    services: Mutex<HashMap<(String, u16), Arc<ServiceState>>>,
    pub rates: rate::RateLimits,
    pub metrics: Arc<TrafficMetrics>,
    /// Request bodies kept for retries (ports that declare HTTP).
    pub kept_bodies: budget::KeptBodies,
}

impl Traffic {
    pub fn new(metrics: Arc<TrafficMetrics>) -> Self {
        Self {
            services: Mutex::default(),
            rates: rate::RateLimits::default(),
            metrics,
            kept_bodies: budget::KeptBodies::default(),
        }
    }

    pub fn service(&self, backend: &Backend) -> Arc<ServiceState> {
        let mut all = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let key = (backend.name.clone(), backend.port);
        if let Some(s) = all.get(&key) {
            return s.clone();
        }
        if all.len() >= PRUNE_ABOVE {
            let now = Instant::now();
            all.retain(|_, s| s.in_use(now));
        }
        let ejections = self.metrics.ejection_series(&backend.name, backend.port);
        let s = Arc::new(ServiceState {
            endpoints: Mutex::default(),
            open: Arc::default(),
            pending: Arc::default(),
            ejections,
            used: Mutex::new(Instant::now()),
            retry_budget: budget::RetryBudget::default(),
        });
        all.insert(key, s.clone());
        s
    }

    /// Endpoints ejected now, by Service and port (read when the metrics are scraped).
    pub fn ejected(&self) -> Vec<(String, u16, usize)> {
        let now = Instant::now();
        let all = self.services.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .map(|((name, port), s)| (name.clone(), *port, s.ejected_now(now)))
            .collect()
    }
}

/// A count held while a connection holds it; released on drop.
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slot {
    /// Takes one of `count` if it is under `limit` (no limit: always).
    pub(crate) fn take(count: &Arc<AtomicU32>, limit: Option<u32>) -> Option<Self> {
        count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                limit.is_none_or(|l| n < l).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

/// Why this node refused a connection before trying any endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Connections(u32),
    Pending(u32),
}

#[derive(Default)]
struct Endpoint {
    outlier: Outlier,
    /// Average connect time, microseconds; 0 until the first.
    ewma_us: f64,
    /// Connections through this Service to it: being made or open.
    load: Arc<AtomicU32>,
}

/// One Service port at this node.
pub struct ServiceState {
    endpoints: Mutex<HashMap<WorkloadId, Endpoint>>,
    /// Connections to the Service from this node, being made or open (`maxConnections`).
    open: Arc<AtomicU32>,
    /// Connections being made (`maxPendingConnects`).
    pending: Arc<AtomicU32>,
    ejections: IntCounter,
    /// When a connection last asked for endpoints.
    used: Mutex<Instant>,
    retry_budget: budget::RetryBudget,
}

/// An endpoint to try, and its share of the load while the connection tries or holds it.
pub struct Candidate {
    pub target: Target,
    load: Arc<AtomicU32>,
}

impl Candidate {
    /// Counts the connection against the endpoint's load until the slot drops.
    pub fn hold(&self) -> Slot {
        self.load.fetch_add(1, Ordering::Relaxed);
        Slot(self.load.clone())
    }
}

impl ServiceState {
    /// Slots for a new connection under `limits`: one of the open connections and one of the
    /// connects in progress.
    pub fn admit(&self, limits: &ConnectionLimits) -> Result<(Slot, Slot), Limited> {
        let open = Slot::take(&self.open, limits.max_connections)
            .ok_or(Limited::Connections(limits.max_connections.unwrap_or(0)))?;
        let pending = Slot::take(&self.pending, limits.max_pending_connects)
            .ok_or(Limited::Pending(limits.max_pending_connects.unwrap_or(0)))?;
        Ok((open, pending))
    }

    /// The endpoints of `targets` a connection tries, in order: those not ejected (all of
    /// them when too few are left, or none is), by the balancer. `turn` is the round-robin's.
    pub fn order(
        &self,
        targets: Vec<Target>,
        lb: LoadBalancer,
        od: &OutlierDetection,
        turn: usize,
    ) -> Vec<Candidate> {
        let now = Instant::now();
        *self.used.lock().unwrap_or_else(|p| p.into_inner()) = now;
        let mut all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        // Endpoints that left the Service do not stay for good.
        if all.len() > targets.len() * 2 + 16 {
            all.retain(|k, _| targets.iter().any(|t| &t.peer.key == k));
        }
        let total = targets.len();
        let mut kept: Vec<(Candidate, u32, f64)> = Vec::with_capacity(total);
        let mut out_now: Vec<(Candidate, u32, f64)> = Vec::new();
        for target in targets {
            let e = all.entry(target.peer.key.clone()).or_default();
            e.outlier.follow(od);
            let entry = (
                Candidate {
                    target,
                    load: e.load.clone(),
                },
                e.load.load(Ordering::Relaxed),
                e.ewma_us,
            );
            if e.outlier.is_ejected(now) {
                out_now.push(entry);
            } else {
                kept.push(entry);
            }
        }
        drop(all);
        if kept.is_empty() || od.panics(kept.len(), total) {
            kept.append(&mut out_now);
        }
        match lb {
            LoadBalancer::RoundRobin => {
                if !kept.is_empty() {
                    let start = turn % kept.len();
                    kept.rotate_left(start);
                }
            }
            LoadBalancer::LeastConnections => least_connections_first(&mut kept),
        }
        kept.into_iter().map(|(c, _, _)| c).collect()
    }

    /// The endpoint answered a connect in `took`.
    pub fn succeeded(&self, key: &WorkloadId, took: Duration) {
        let mut all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let e = all.entry(key.clone()).or_default();
        e.outlier.succeeded();
        let sample = took.as_secs_f64() * 1e6;
        e.ewma_us = if e.ewma_us == 0.0 {
            sample
        } else {
            e.ewma_us * (1.0 - EWMA_WEIGHT) + sample * EWMA_WEIGHT
        };
    }

    /// The endpoint answered a request with a status outlier detection does not count: its
    /// streak of failures ends.
    pub fn answered(&self, key: &WorkloadId) {
        let mut all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(key.clone()).or_default().outlier.succeeded();
    }

    /// The budget that retries of requests to this Service port draw on.
    pub fn retry_budget(&self) -> &budget::RetryBudget {
        &self.retry_budget
    }

    /// A connect to the endpoint failed; ejects it when that completes a streak and the
    /// Service's cap allows (`endpoints`: how many it has now). Returns the ejection's length.
    pub fn failed(
        &self,
        key: &WorkloadId,
        od: &OutlierDetection,
        endpoints: usize,
    ) -> Option<Duration> {
        let now = Instant::now();
        let mut all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let ejected = all.values().filter(|e| e.outlier.is_ejected(now)).count();
        let cap = od.max_ejected(endpoints);
        let e = all.entry(key.clone()).or_default();
        let out = e.outlier.failed(now, od, || ejected < cap);
        if out.is_some() {
            self.ejections.inc();
        }
        out
    }

    fn ejected_now(&self, now: Instant) -> usize {
        let all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        all.values().filter(|e| e.outlier.is_ejected(now)).count()
    }

    /// Whether a connection used it lately, or one of its endpoints is out.
    fn in_use(&self, now: Instant) -> bool {
        let used = *self.used.lock().unwrap_or_else(|p| p.into_inner());
        now.saturating_duration_since(used) < FORGET_AFTER || self.ejected_now(now) > 0
    }
}

/// Power of two choices: of two endpoints picked at random, the one with the smaller load
/// (then the faster connects) goes first; the rest follow by load, for the retries.
fn least_connections_first(kept: &mut [(Candidate, u32, f64)]) {
    if kept.len() < 2 {
        return;
    }
    let a = fastrand::usize(..kept.len());
    let mut b = fastrand::usize(..kept.len() - 1);
    if b >= a {
        b += 1;
    }
    let better = |x: &(Candidate, u32, f64), y: &(Candidate, u32, f64)| (x.1, x.2) <= (y.1, y.2);
    let first = if better(&kept[a], &kept[b]) { a } else { b };
    kept.swap(0, first);
    kept[1..].sort_by(|x, y| x.1.cmp(&y.1).then(x.2.total_cmp(&y.2)));
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::proxy::directory::Peer;

    fn target(name: &str, last: u8) -> Target {
        Target {
            peer: Arc::new(Peer {
                key: WorkloadId::new("shop", name),
                identity: format!("spiffe://td/ns/shop/sa/{name}").parse().unwrap(),
                identity_uri: String::new(),
                addresses: vec![],
                labels: Default::default(),
                node: "n1".into(),
            }),
            addr: SocketAddr::from(([10, 0, 0, last], 8080)),
        }
    }

    fn state() -> ServiceState {
        let registry = prometheus::Registry::new();
        let metrics = TrafficMetrics::register(&registry).unwrap();
        let ejections = metrics.ejection_series("shop/pay", 80);
        ServiceState {
            endpoints: Mutex::default(),
            open: Arc::default(),
            pending: Arc::default(),
            ejections,
            used: Mutex::new(Instant::now()),
            retry_budget: budget::RetryBudget::default(),
        }
    }

    fn names(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.target.peer.key.name.as_str()).collect()
    }

    fn three() -> Vec<Target> {
        vec![target("a", 1), target("b", 2), target("c", 3)]
    }

    #[test]
    fn ejected_endpoints_get_nothing_until_their_time_is_up() {
        let s = state();
        let od = OutlierDetection {
            consecutive_failures: 2,
            base_ejection_time: Duration::from_millis(200),
            ..OutlierDetection::default()
        };
        let rr = LoadBalancer::RoundRobin;
        assert_eq!(names(&s.order(three(), rr, &od, 1)), ["b", "c", "a"]);
        let b = WorkloadId::new("shop", "b");
        assert_eq!(s.failed(&b, &od, 3), None);
        assert_eq!(s.failed(&b, &od, 3), Some(Duration::from_millis(200)));
        assert_eq!(s.ejected_now(Instant::now()), 1);
        assert_eq!(s.ejections.get(), 1);
        for turn in 0..4 {
            assert!(!names(&s.order(three(), rr, &od, turn)).contains(&"b"));
        }
        // 50 % of three is two, rounded up, but the cap counts: c can go too, a cannot.
        let c = WorkloadId::new("shop", "c");
        s.failed(&c, &od, 3);
        assert!(s.failed(&c, &od, 3).is_some());
        let a = WorkloadId::new("shop", "a");
        s.failed(&a, &od, 3);
        assert_eq!(s.failed(&a, &od, 3), None);
        assert_eq!(names(&s.order(three(), rr, &od, 0)), ["a"]);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(names(&s.order(three(), rr, &od, 0)).len(), 3);
        assert_eq!(s.ejected_now(Instant::now()), 0);
    }

    #[test]
    fn panic_threshold_brings_every_endpoint_back() {
        let s = state();
        let od = OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 100,
            panic_threshold_percent: 50,
            ..OutlierDetection::default()
        };
        s.failed(&WorkloadId::new("shop", "a"), &od, 3);
        assert_eq!(s.order(three(), LoadBalancer::RoundRobin, &od, 0).len(), 2);
        s.failed(&WorkloadId::new("shop", "b"), &od, 3);
        // One of three left is under 50 %: all three take connections again.
        assert_eq!(s.order(three(), LoadBalancer::RoundRobin, &od, 0).len(), 3);
    }

    #[test]
    fn least_connections_prefers_the_less_loaded() {
        let s = state();
        let od = OutlierDetection::default();
        let lc = LoadBalancer::LeastConnections;
        // Load a with ten connections: of any two picks that include it, the other wins.
        let held: Vec<Slot> = {
            let order = s.order(three(), lc, &od, 0);
            let a = order
                .iter()
                .find(|c| c.target.peer.key.name == "a")
                .unwrap();
            (0..10).map(|_| a.hold()).collect()
        };
        for _ in 0..50 {
            let order = s.order(three(), lc, &od, 0);
            assert_ne!(names(&order)[0], "a");
            assert_eq!(names(&order)[2], "a");
        }
        drop(held);
        // Equal load: the faster connects win the tie.
        s.succeeded(&WorkloadId::new("shop", "b"), Duration::from_millis(50));
        s.succeeded(&WorkloadId::new("shop", "a"), Duration::from_millis(1));
        s.succeeded(&WorkloadId::new("shop", "c"), Duration::from_millis(1));
        for _ in 0..50 {
            assert_ne!(names(&s.order(three(), lc, &od, 0))[0], "b");
        }
    }

    #[test]
    fn limits_refuse_over_their_count_and_free_on_drop() {
        let s = state();
        let limits = ConnectionLimits {
            max_connections: Some(2),
            max_pending_connects: Some(1),
        };
        let first = s.admit(&limits).unwrap();
        assert_eq!(s.admit(&limits).err(), Some(Limited::Pending(1)));
        drop(first.1); // connected: no longer pending
        let second = s.admit(&limits).unwrap();
        assert_eq!(s.admit(&limits).err(), Some(Limited::Connections(2)));
        drop(second);
        assert!(s.admit(&limits).is_ok());
        assert!(s.admit(&ConnectionLimits::default()).is_ok());
    }
}
