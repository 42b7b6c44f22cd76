//! How much others can make this node hold: connections open and handshakes in progress,
//! counted per pod and per source address.
//!
//! Every port a pod exposes to the network (the tunnel listener, QUIC, the plaintext listener)
//! takes a connection only with a [`Permit`], asked for before any work is done for it. A
//! tunnel is a handshake until its first header has arrived (a stranger without a certificate
//! never gets further), then an open connection. Over a limit, the connection is refused at
//! once (a TCP reset, a refused QUIC connection or stream, or an `OVERLOADED` answer once a
//! tunnel is up), counted in `mycel_connections_limited_total{limit}`, and logged once per
//! [`LOG_INTERVAL`] for each limit with the number refused since the last line. The per-source
//! limits keep one noisy or hostile peer from taking a pod's whole allowance; the per-pod ones
//! bound what all of them together can take, and the node-wide one what all pods can. Sources
//! that are not mesh workloads (strangers) share half of a pod's handshakes, so that no crowd
//! of them can keep the mesh's own peers out, and an IPv6 stranger counts by its /64 (one
//! host can hold many addresses of its prefix). A pod's own application is held to a limit on
//! its outbound connections, so one pod cannot take the node's descriptors either.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, Opts};

use crate::workloads::WorkloadId;

/// At most one log line per limit in this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The limits, as configured on the command line.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Connections to one pod, tunnelled and plaintext, open at once.
    pub connections_per_pod: u32,
    /// Connections from one source address to this node's pods, open at once.
    pub connections_per_source: u32,
    /// Handshakes (TLS, QUIC, or a tunnel's first header) in progress for one pod.
    pub handshakes_per_pod: u32,
    /// Handshakes in progress from one source address.
    pub handshakes_per_source: u32,
    /// Handshakes in progress on the whole node.
    pub handshakes_per_node: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            connections_per_pod: 16_384,
            connections_per_source: 4_096,
            handshakes_per_pod: 1_024,
            handshakes_per_source: 128,
            handshakes_per_node: 2_048,
        }
    }
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    PodConnections,
    SourceConnections,
    PodHandshakes,
    SourceHandshakes,
    /// A pod's own application has too many outbound connections open.
    PodOutbound,
    /// Sources outside the mesh hold their share of a pod's handshakes.
    StrangerHandshakes,
    /// The node holds as many handshakes as it takes.
    NodeHandshakes,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Limit::PodConnections,
        Limit::SourceConnections,
        Limit::PodHandshakes,
        Limit::SourceHandshakes,
        Limit::PodOutbound,
        Limit::StrangerHandshakes,
        Limit::NodeHandshakes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PodConnections => "pod_connections",
            Limit::SourceConnections => "source_connections",
            Limit::PodHandshakes => "pod_handshakes",
            Limit::SourceHandshakes => "source_handshakes",
            Limit::PodOutbound => "pod_outbound_connections",
            Limit::StrangerHandshakes => "stranger_handshakes",
            Limit::NodeHandshakes => "node_handshakes",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Limit::PodConnections | Limit::PodOutbound => "--max-connections-per-pod",
            Limit::SourceConnections => "--max-connections-per-source",
            Limit::PodHandshakes | Limit::StrangerHandshakes => "--max-handshakes-per-pod",
            Limit::SourceHandshakes => "--max-handshakes-per-source",
            Limit::NodeHandshakes => "--max-handshakes-per-node",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pod's counts; its [`PodContext`](super::PodContext) owns them.
#[derive(Debug, Default)]
pub struct PodLoad {
    open: AtomicU32,
    handshakes: AtomicU32,
    /// Of `handshakes`, those from strangers.
    stranger_handshakes: AtomicU32,
    outbound: AtomicU32,
    /// Bytes of this pod's request bodies kept for retries (`traffic::budget::KeptBodies`).
    pub kept_body_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl PodLoad {
    /// (open inbound connections, handshakes in progress, open outbound connections).
    #[cfg(test)]
    fn counts(&self) -> (u32, u32, u32) {
        (
            self.open.load(Ordering::Relaxed),
            self.handshakes.load(Ordering::Relaxed),
            self.outbound.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
struct SourceLoad {
    open: u32,
    handshakes: u32,
}

/// The node's limits and the per-source counts; one per daemon.
pub struct Limits {
    config: Config,
    /// Sources with anything in progress; an entry goes when its counts reach zero, so the
    /// map is never larger than the connections it counts.
    sources: Mutex<HashMap<IpAddr, SourceLoad>>,
    node_handshakes: AtomicU32,
    refused: IntCounterVec,
    logs: [ThrottledLog; Limit::ALL.len()],
}

impl Limits {
    /// `refused` is `mycel_connections_limited_total`; see [`Limits::counter`].
    pub fn new(config: Config, refused: IntCounterVec) -> Self {
        Self {
            config,
            sources: Mutex::default(),
            node_handshakes: AtomicU32::new(0),
            refused,
            logs: Default::default(),
        }
    }

    /// The counter family to register with the node's metrics.
    pub fn counter() -> prometheus::Result<IntCounterVec> {
        let c = IntCounterVec::new(
            Opts::new(
                format!("{}_connections_limited_total", crate::metrics::PREFIX),
                "Connections refused because a limit on connections or handshakes was reached",
            ),
            &["limit"],
        )?;
        for l in Limit::ALL {
            c.with_label_values(&[l.as_str()]);
        }
        Ok(c)
    }

    /// Inbound connections open and handshakes in progress on this node, from every source.
    pub fn totals(&self) -> (u64, u64) {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.values().fold((0, 0), |(o, h), s| {
            (o + u64::from(s.open), h + u64::from(s.handshakes))
        })
    }

    /// A handshake from `source` to the pod whose counts are `pod`; a `stranger` is a source
    /// that is not a mesh workload.
    pub fn handshake(
        self: &Arc<Self>,
        pod: &Arc<PodLoad>,
        workload: &WorkloadId,
        source: IpAddr,
        stranger: bool,
    ) -> Result<Permit, Limit> {
        let c = self.config;
        let key = source_key(source, stranger);
        if !take_atomic(&self.node_handshakes, c.handshakes_per_node) {
            self.refuse(Limit::NodeHandshakes, workload, Some(source));
            return Err(Limit::NodeHandshakes);
        }
        if stranger && !take_atomic(&pod.stranger_handshakes, c.handshakes_per_pod / 2) {
            self.node_handshakes.fetch_sub(1, Ordering::AcqRel);
            self.refuse(Limit::StrangerHandshakes, workload, Some(source));
            return Err(Limit::StrangerHandshakes);
        }
        let taken = self.take(
            workload,
            key,
            (&pod.handshakes, c.handshakes_per_pod, Limit::PodHandshakes),
            |s| {
                (
                    &mut s.handshakes,
                    c.handshakes_per_source,
                    Limit::SourceHandshakes,
                )
            },
        );
        if let Err(limit) = taken {
            self.node_handshakes.fetch_sub(1, Ordering::AcqRel);
            if stranger {
                pod.stranger_handshakes.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(limit);
        }
        Ok(Permit {
            limits: self.clone(),
            pod: pod.clone(),
            source: key,
            stage: Stage::Handshake,
            stranger,
        })
    }

    /// Whether the pod holds more than half of its handshakes: a QUIC connection then has to
    /// prove its address first.
    pub fn under_pressure(&self, pod: &PodLoad) -> bool {
        pod.handshakes.load(Ordering::Relaxed) > self.config.handshakes_per_pod / 2
            || self.node_handshakes.load(Ordering::Relaxed) > self.config.handshakes_per_node / 2
    }

    /// An open connection from `source` to the pod whose counts are `pod`, without a
    /// handshake (plaintext, a QUIC stream); `stranger` as for [`Limits::handshake`].
    pub fn open(
        self: &Arc<Self>,
        pod: &Arc<PodLoad>,
        workload: &WorkloadId,
        source: IpAddr,
        stranger: bool,
    ) -> Result<Permit, Limit> {
        let c = self.config;
        let source = source_key(source, stranger);
        self.take(
            workload,
            source,
            (&pod.open, c.connections_per_pod, Limit::PodConnections),
            |s| {
                (
                    &mut s.open,
                    c.connections_per_source,
                    Limit::SourceConnections,
                )
            },
        )?;
        Ok(Permit {
            limits: self.clone(),
            pod: pod.clone(),
            source,
            stage: Stage::Open,
            stranger,
        })
    }

    /// An outbound connection of the pod's own application.
    pub fn outbound(
        self: &Arc<Self>,
        pod: &Arc<PodLoad>,
        workload: &WorkloadId,
    ) -> Result<OutboundPermit, Limit> {
        if !take_atomic(&pod.outbound, self.config.connections_per_pod) {
            self.refuse(Limit::PodOutbound, workload, None);
            return Err(Limit::PodOutbound);
        }
        Ok(OutboundPermit(pod.clone()))
    }

    /// Takes one from the pod's counter and one from the source's, or neither.
    fn take(
        &self,
        workload: &WorkloadId,
        source: IpAddr,
        (pod_count, pod_max, pod_limit): (&AtomicU32, u32, Limit),
        source_count: impl FnOnce(&mut SourceLoad) -> (&mut u32, u32, Limit),
    ) -> Result<(), Limit> {
        if !take_atomic(pod_count, pod_max) {
            self.refuse(pod_limit, workload, Some(source));
            return Err(pod_limit);
        }
        let refused = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let load = sources.entry(source).or_default();
            let (count, max, limit) = source_count(load);
            if *count < max {
                *count += 1;
                None
            } else {
                if load.open == 0 && load.handshakes == 0 {
                    sources.remove(&source);
                }
                Some(limit)
            }
        };
        match refused {
            None => Ok(()),
            Some(limit) => {
                pod_count.fetch_sub(1, Ordering::AcqRel);
                self.refuse(limit, workload, Some(source));
                Err(limit)
            }
        }
    }

    fn give_back(&self, source: IpAddr, stage: Stage) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(load) = sources.get_mut(&source) {
            let count = match stage {
                Stage::Handshake => &mut load.handshakes,
                Stage::Open => &mut load.open,
            };
            *count = count.saturating_sub(1);
            if load.open == 0 && load.handshakes == 0 {
                sources.remove(&source);
            }
        }
    }

    fn refuse(&self, limit: Limit, workload: &WorkloadId, source: Option<IpAddr>) {
        self.refused.with_label_values(&[limit.as_str()]).inc();
        let max = match limit {
            Limit::PodConnections | Limit::PodOutbound => self.config.connections_per_pod,
            Limit::SourceConnections => self.config.connections_per_source,
            Limit::PodHandshakes => self.config.handshakes_per_pod,
            Limit::StrangerHandshakes => self.config.handshakes_per_pod / 2,
            Limit::SourceHandshakes => self.config.handshakes_per_source,
            Limit::NodeHandshakes => self.config.handshakes_per_node,
        };
        if let Some(suppressed) = self.logs[limit as usize].should_log() {
            tracing::warn!(
                %limit, max, flag = limit.flag(), %workload,
                source = %source.map_or_else(|| "the pod itself".to_owned(), |s| s.to_string()),
                refused_since_last_line = suppressed + 1,
                "connection limit reached; connections over it are refused"
            );
        }
    }

    /// Sources with a connection or handshake in progress (for tests and /debug).
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// What a source is counted under: its address, or for an IPv6 stranger its /64.
fn source_key(source: IpAddr, stranger: bool) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) if stranger => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        other => other,
    }
}

/// Increments `count` if it is below `max`.
fn take_atomic(count: &AtomicU32, max: u32) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Handshake,
    Open,
}

/// A connection's place within the limits; given back when dropped.
pub struct Permit {
    limits: Arc<Limits>,
    pod: Arc<PodLoad>,
    /// What the source is counted under ([`source_key`]).
    source: IpAddr,
    stage: Stage,
    stranger: bool,
}

impl Permit {
    /// The handshake is over: the connection now counts as open. On `Err` the permit still
    /// holds the handshake, given back when it drops.
    pub fn opened(&mut self, workload: &WorkloadId) -> Result<(), Limit> {
        if self.stage == Stage::Open {
            return Ok(());
        }
        let c = self.limits.config;
        self.limits.take(
            workload,
            self.source,
            (&self.pod.open, c.connections_per_pod, Limit::PodConnections),
            |s| {
                (
                    &mut s.open,
                    c.connections_per_source,
                    Limit::SourceConnections,
                )
            },
        )?;
        self.end_handshake();
        self.stage = Stage::Open;
        Ok(())
    }

    fn end_handshake(&self) {
        self.pod.handshakes.fetch_sub(1, Ordering::AcqRel);
        self.limits.node_handshakes.fetch_sub(1, Ordering::AcqRel);
        if self.stranger {
            self.pod.stranger_handshakes.fetch_sub(1, Ordering::AcqRel);
        }
        self.limits.give_back(self.source, Stage::Handshake);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.stage {
            Stage::Handshake => self.end_handshake(),
            Stage::Open => {
                self.pod.open.fetch_sub(1, Ordering::AcqRel);
                self.limits.give_back(self.source, Stage::Open);
            }
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("source", &self.source)
            .field("stage", &self.stage)
            .finish()
    }
}

/// An outbound connection's place within its pod's limit; given back when dropped.
pub struct OutboundPermit(Arc<PodLoad>);

impl Drop for OutboundPermit {
    fn drop(&mut self) {
        self.0.outbound.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lets one line through per [`LOG_INTERVAL`] and counts the ones it held back.
#[derive(Default)]
struct ThrottledLog {
    /// Milliseconds since `EPOCH` of the last line, plus one (0: never).
    last: AtomicU64,
    held_back: AtomicU64,
}

impl ThrottledLog {
    /// `Some(lines held back since the last one)` when this line may be written.
    fn should_log(&self) -> Option<u64> {
        self.should_log_at(millis_since_start())
    }

    fn should_log_at(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms + 1;
        let interval = LOG_INTERVAL.as_millis() as u64;
        let last = self.last.load(Ordering::Acquire);
        if last != 0 && now < last + interval {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One caller per interval wins; the others count as held back.
        if self
            .last
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held_back.swap(0, Ordering::AcqRel))
    }
}

fn millis_since_start() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: Config) -> Arc<Limits> {
        Arc::new(Limits::new(config, Limits::counter().unwrap()))
    }

    fn small() -> Config {
        Config {
            connections_per_pod: 3,
            connections_per_source: 2,
            handshakes_per_pod: 3,
            handshakes_per_source: 2,
            handshakes_per_node: 5,
        }
    }

    fn refused(l: &Limits, limit: Limit) -> u64 {
        l.refused.with_label_values(&[limit.as_str()]).get()
    }

    #[test]
    fn handshakes_are_held_to_both_limits_and_given_back() {
        let l = limits(small());
        let pod = Arc::new(PodLoad::default());
        let w = WorkloadId::new("default", "a");
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = l.handshake(&pod, &w, a, false).unwrap();
        let a2 = l.handshake(&pod, &w, a, false).unwrap();
        assert_eq!(
            l.handshake(&pod, &w, a, false).unwrap_err(),
            Limit::SourceHandshakes
        );
        let b1 = l.handshake(&pod, &w, b, false).unwrap();
        // The pod is full: another source is refused too, and nothing is left taken.
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(
            l.handshake(&pod, &w, c, false).unwrap_err(),
            Limit::PodHandshakes
        );
        assert_eq!(pod.counts(), (0, 3, 0));
        assert_eq!(l.sources(), 2);
        drop((a1, a2, b1));
        assert_eq!(pod.counts(), (0, 0, 0));
        assert_eq!(
            l.sources(),
            0,
            "sources with nothing in progress are forgotten"
        );
        assert_eq!(refused(&l, Limit::SourceHandshakes), 1);
        assert_eq!(refused(&l, Limit::PodHandshakes), 1);
    }

    #[test]
    fn an_opened_handshake_moves_to_the_connection_limits() {
        let l = limits(small());
        let pod = Arc::new(PodLoad::default());
        let w = WorkloadId::new("default", "a");
        let a: IpAddr = "fd00::1".parse().unwrap();
        let mut p1 = l.handshake(&pod, &w, a, false).unwrap();
        p1.opened(&w).unwrap();
        p1.opened(&w).unwrap();
        assert_eq!(pod.counts(), (1, 0, 0));
        let _p2 = l.open(&pod, &w, a, false).unwrap();
        let mut p3 = l.handshake(&pod, &w, a, false).unwrap();
        // The source's connections are at their limit: the handshake stays a handshake.
        assert_eq!(p3.opened(&w).unwrap_err(), Limit::SourceConnections);
        assert_eq!(pod.counts(), (2, 1, 0));
        drop(p3);
        drop(p1);
        assert_eq!(pod.counts(), (1, 0, 0));
        assert_eq!(l.sources(), 1);
    }

    /// Regression (issue 19 review): eight sources outside the mesh could hold all of a
    /// pod's handshakes, and an IPv6 one had an allowance per address of its /64.
    #[test]
    fn strangers_share_half_a_pod_and_count_by_their_64() {
        let l = limits(Config {
            handshakes_per_pod: 8,
            handshakes_per_source: 8,
            handshakes_per_node: 100,
            ..small()
        });
        let pod = Arc::new(PodLoad::default());
        let w = WorkloadId::new("default", "a");
        let stranger = |i: u16| -> IpAddr { format!("2001:db8::{i:x}").parse().unwrap() };
        let held: Vec<_> = (1..=4)
            .map(|i| l.handshake(&pod, &w, stranger(i), true).unwrap())
            .collect();
        assert_eq!(
            l.handshake(&pod, &w, stranger(9), true).unwrap_err(),
            Limit::StrangerHandshakes
        );
        assert_eq!(l.sources(), 1, "one /64");
        // The mesh's own peers still have the other half.
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let mesh: Vec<_> = (0..4)
            .map(|_| l.handshake(&pod, &w, peer, false).unwrap())
            .collect();
        drop((held, mesh));
        assert_eq!(pod.counts(), (0, 0, 0));
        assert_eq!(pod.stranger_handshakes.load(Ordering::Relaxed), 0);
        assert_eq!(l.sources(), 0);
        // A mesh peer's IPv6 address counts alone.
        assert_eq!(source_key(stranger(1), false), stranger(1));
    }

    #[test]
    fn the_node_caps_handshakes_across_its_pods() {
        let l = limits(small());
        let w = WorkloadId::new("default", "a");
        let pods: Vec<Arc<PodLoad>> = (0..3).map(|_| Arc::default()).collect();
        let mut held = Vec::new();
        for (i, pod) in pods.iter().enumerate() {
            for j in 0..2u8 {
                let ip: IpAddr = format!("10.0.{i}.{j}").parse().unwrap();
                if let Ok(p) = l.handshake(pod, &w, ip, false) {
                    held.push(p);
                }
            }
        }
        assert_eq!(held.len(), 5);
        assert_eq!(refused(&l, Limit::NodeHandshakes), 1);
        let mut opened = held.pop().unwrap();
        opened.opened(&w).unwrap();
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(
            l.handshake(&pods[2], &w, ip, false).is_ok(),
            "an opened handshake frees a place"
        );
        drop((held, opened));
        assert_eq!(l.node_handshakes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn outbound_connections_are_held_to_the_pod_limit() {
        let l = limits(small());
        let pod = Arc::new(PodLoad::default());
        let w = WorkloadId::new("default", "a");
        let held: Vec<_> = (0..3).map(|_| l.outbound(&pod, &w).unwrap()).collect();
        assert!(l.outbound(&pod, &w).is_err());
        drop(held);
        assert_eq!(pod.counts(), (0, 0, 0));
        assert!(l.outbound(&pod, &w).is_ok());
        assert_eq!(refused(&l, Limit::PodOutbound), 1);
    }

    #[test]
    fn one_line_per_interval_counts_what_it_held_back() {
        let log = ThrottledLog::default();
        let interval = LOG_INTERVAL.as_millis() as u64;
        assert_eq!(log.should_log_at(5), Some(0));
        assert_eq!(log.should_log_at(6), None);
        assert_eq!(log.should_log_at(4 + interval), None);
        assert_eq!(log.should_log_at(5 + interval), Some(2));
        assert_eq!(log.should_log_at(6 + interval), None);
    }
}
