//! The nodes' `/metrics`, scraped: each pair's counters summed over the nodes at one moment,
//! and the rates between two such moments.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{histogram, pair_of, Pair, PairKey};
use crate::{
    client::{self, ClientError, Limits},
    exposition::Exposition,
};

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(transparent)]
    Http(#[from] ClientError),
    #[error("{node}/metrics is not Prometheus's text format: {reason}")]
    NotMetrics { node: String, reason: String },
}

/// Nodes scraped at once by [`Scrape::of_each`]: each waits on the network, not the CPU.
pub const PARALLEL: usize = 16;

/// What one node's counters say of one pair at one moment.
#[derive(Debug, Clone, Default)]
struct Counters {
    opened: f64,
    failed: BTreeMap<String, f64>,
    bytes: f64,
    open: f64,
    requests: f64,
    /// Request duration buckets: upper bound (as written) to cumulative count.
    buckets: BTreeMap<String, f64>,
}

/// What one scrape of a node may take: a node's `/metrics` is far smaller, and the reader
/// waits on every node it scrapes.
pub const LIMITS: Limits = Limits {
    time: Duration::from_secs(5),
    size: 16 << 20,
};

/// One scrape of some nodes: each pair's counters by node, so that a node whose counters
/// started again between two scrapes (a restart) counts from zero, not against the others.
#[derive(Debug, Clone)]
pub struct Scrape {
    pairs: BTreeMap<PairKey, BTreeMap<String, Counters>>,
    /// The nodes that answered: rates are taken only for a node in both scrapes.
    answered: std::collections::BTreeSet<String>,
    taken: Instant,
}

impl Default for Scrape {
    fn default() -> Self {
        Self {
            pairs: BTreeMap::new(),
            answered: Default::default(),
            taken: Instant::now(),
        }
    }
}

impl Scrape {
    /// Scrapes every node in `nodes` (metrics addresses, host:port); fails with the first
    /// that did not answer.
    pub fn of(nodes: &[String]) -> Result<Self, ScrapeError> {
        let (out, failed) = Self::of_each(nodes);
        match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(out),
        }
    }

    /// Scrapes every node it can of `nodes`, [`PARALLEL`] at a time; what did not answer,
    /// with why.
    pub fn of_each(nodes: &[String]) -> (Self, Vec<(String, ScrapeError)>) {
        let mut out = Scrape::default();
        let mut failed = Vec::new();
        let nodes = distinct(nodes);
        for chunk in nodes.chunks(PARALLEL) {
            let answers: Vec<Result<Exposition, ScrapeError>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk.iter().map(|n| s.spawn(|| fetch(n))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(ScrapeError::NotMetrics {
                                node: String::new(),
                                reason: "the scrape panicked".into(),
                            })
                        })
                    })
                    .collect()
            });
            for (node, answer) in chunk.iter().zip(answers) {
                match answer {
                    Ok(e) => out.add(node, &e),
                    Err(e) => failed.push(((*node).to_owned(), e)),
                }
            }
        }
        out.taken = Instant::now();
        (out, failed)
    }

    /// Adds `node`'s source-side series (values that are not finite numbers are left out).
    pub fn add(&mut self, node: &str, e: &Exposition) {
        self.answered.insert(node.to_owned());
        let source = [("reporter", "source")];
        let mut out: BTreeMap<PairKey, Counters> = BTreeMap::new();
        let each = |name: &str| {
            e.matching(name, &source)
                .filter(|(_, v)| v.is_finite())
                .filter_map(|(l, v)| Some((pair_of(l)?, l, v)))
                .collect::<Vec<_>>()
        };
        for (key, _, v) in each("mycel_tcp_connections_opened_total") {
            out.entry(key).or_default().opened += v;
        }
        for (key, l, v) in each("mycel_tcp_connections_failed_total") {
            let reason = l.get("reason").cloned().unwrap_or_default();
            *out.entry(key)
                .or_default()
                .failed
                .entry(reason)
                .or_default() += v;
        }
        for name in [
            "mycel_tcp_sent_bytes_total",
            "mycel_tcp_received_bytes_total",
        ] {
            for (key, _, v) in each(name) {
                out.entry(key).or_default().bytes += v;
            }
        }
        for (key, _, v) in each("mycel_tcp_connections_open") {
            out.entry(key).or_default().open += v;
        }
        for (key, _, v) in each("mycel_http_requests_total") {
            out.entry(key).or_default().requests += v;
        }
        for (key, l, v) in each("mycel_http_request_duration_seconds_bucket") {
            let le = l.get("le").cloned().unwrap_or_default();
            *out.entry(key).or_default().buckets.entry(le).or_default() += v;
        }
        for (key, counters) in out {
            self.pairs
                .entry(key)
                .or_default()
                .insert(node.to_owned(), counters);
        }
    }

    /// Each pair of this scrape, with its rates since `before` (an earlier scrape of the same
    /// nodes; rates are 0 without one).
    pub fn rates_since(&self, before: Option<&Scrape>) -> Vec<Pair> {
        let seconds = before
            .map(|b| self.taken.saturating_duration_since(b.taken))
            .filter(|d| *d >= Duration::from_millis(1))
            .map(|d| d.as_secs_f64());
        let zero = Counters::default();
        self.pairs
            .iter()
            .map(|(key, by_node)| {
                let mut total = Counters::default();
                let mut window = Counters::default();
                for (node, now) in by_node {
                    total.sum(now);
                    // A node that did not answer the earlier scrape (it failed then, or
                    // joined since) has no window: its totals are not one window's traffic.
                    let Some(b) = before.filter(|b| b.answered.contains(node)) else {
                        continue;
                    };
                    let was = b.pairs.get(key).and_then(|p| p.get(node)).unwrap_or(&zero);
                    window.sum(&now.since(was));
                }
                let rate = |v: f64| seconds.map_or(0.0, |s| v / s);
                let buckets = sorted(&window.buckets);
                let q = |q| seconds.and_then(|_| histogram::quantile(q, &buckets));
                Pair {
                    source: key.0.clone(),
                    destination: key.1.clone(),
                    connections_per_second: rate(window.opened),
                    bytes_per_second: rate(window.bytes),
                    failures_per_second: rate(sum(&window.failed)),
                    connections_open: total.open,
                    connections_total: total.opened,
                    failures_total: sum(&total.failed),
                    failure_reasons: total.failed,
                    requests_per_second: rate(window.requests),
                    request_p50: q(0.5),
                    request_p95: q(0.95),
                    request_p99: q(0.99),
                }
            })
            .collect()
    }
}

impl Counters {
    /// Adds `other`'s counts to these.
    fn sum(&mut self, other: &Counters) {
        self.opened += other.opened;
        self.bytes += other.bytes;
        self.open += other.open;
        self.requests += other.requests;
        for (k, v) in &other.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.buckets {
            *self.buckets.entry(k.clone()).or_default() += v;
        }
    }

    /// What these counters of one node counted since `was`, an earlier reading of the same
    /// node. A counter below its earlier value means the node started counting again (a
    /// restart): then everything it holds is new, histogram buckets included.
    fn since(&self, was: &Counters) -> Counters {
        let went_back = |now: &BTreeMap<String, f64>, was: &BTreeMap<String, f64>| {
            was.iter()
                .any(|(k, w)| now.get(k).copied().unwrap_or(0.0) < *w)
        };
        let restarted = self.opened < was.opened
            || self.bytes < was.bytes
            || self.requests < was.requests
            || went_back(&self.failed, &was.failed)
            || went_back(&self.buckets, &was.buckets);
        let zero = Counters::default();
        let was = if restarted { &zero } else { was };
        let delta = |now: f64, was: f64| (now - was).max(0.0);
        let map = |now: &BTreeMap<String, f64>, was: &BTreeMap<String, f64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), delta(*v, was.get(k).copied().unwrap_or(0.0))))
                .collect()
        };
        Counters {
            opened: delta(self.opened, was.opened),
            failed: map(&self.failed, &was.failed),
            bytes: delta(self.bytes, was.bytes),
            open: self.open,
            requests: delta(self.requests, was.requests),
            buckets: map(&self.buckets, &was.buckets),
        }
    }
}

/// The sum of `counts`, 0 when there are none (a float sum of nothing is -0, printed "-0.0").
fn sum(counts: &BTreeMap<String, f64>) -> f64 {
    counts.values().fold(0.0, |a, b| a + b)
}

/// `names` without repeats, in their order: a node named twice is scraped once.
fn distinct(names: &[String]) -> Vec<&str> {
    let mut seen = std::collections::BTreeSet::new();
    names
        .iter()
        .map(String::as_str)
        .filter(|n| seen.insert(*n))
        .collect()
}

/// Scrapes the nodes twice, `interval` apart: each pair with its rates over that time.
pub fn pairs(nodes: &[String], interval: Duration) -> Result<Vec<Pair>, ScrapeError> {
    let first = Scrape::of(nodes)?;
    std::thread::sleep(interval);
    let second = Scrape::of(nodes)?;
    Ok(second.rates_since(Some(&first)))
}

fn fetch(node: &str) -> Result<Exposition, ScrapeError> {
    let text = client::get_ok_within(node, "/metrics", LIMITS)?;
    Exposition::parse(&text).map_err(|reason| ScrapeError::NotMetrics {
        node: node.to_owned(),
        reason,
    })
}

/// Histogram buckets by upper bound as written, sorted by that bound as a number.
fn sorted(buckets: &BTreeMap<String, f64>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(le, n)| Some((le.parse().ok()?, *n)))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(nodes: &[(&str, &str)]) -> Scrape {
        let mut s = Scrape::default();
        for (node, text) in nodes {
            s.add(node, &Exposition::parse(text).unwrap());
        }
        s
    }

    const PAIR: &str = "reporter=\"source\",source_namespace=\"default\",source_workload=\"order\",destination_namespace=\"default\",destination_workload=\"payment\"";

    #[test]
    fn rates_are_the_difference_over_the_time_between() {
        let mut before = scrape(&[("n1", &format!("mycel_tcp_connections_opened_total{{{PAIR}}} 10\nmycel_tcp_connections_failed_total{{{PAIR},reason=\"denied\"}} 1\n"))]);
        before.taken -= Duration::from_secs(2);
        let now = scrape(&[("n1", &format!("mycel_tcp_connections_opened_total{{{PAIR}}} 30\nmycel_tcp_connections_failed_total{{{PAIR},reason=\"denied\"}} 5\nmycel_tcp_connections_opened_total{{reporter=\"destination\",source_namespace=\"default\",source_workload=\"order\",destination_namespace=\"default\",destination_workload=\"payment\"}} 99\n"))]);
        let pairs = now.rates_since(Some(&before));
        assert_eq!(pairs.len(), 1);
        let p = &pairs[0];
        assert_eq!(
            (p.source.as_str(), p.destination.as_str()),
            ("default/order", "default/payment")
        );
        assert!((p.connections_per_second - 10.0).abs() < 0.1, "{p:?}");
        assert!((p.failures_per_second - 2.0).abs() < 0.1, "{p:?}");
        // Only the source's report counts: the destination's 99 is the same connections.
        assert_eq!(p.connections_total, 30.0);
        assert_eq!(p.failure_reasons.get("denied"), Some(&5.0));
        // Without an earlier scrape: totals, no rates.
        assert_eq!(now.rates_since(None)[0].connections_per_second, 0.0);
        // No failure is 0, not -0 (which prints "-0.0").
        let quiet = scrape(&[(
            "n1",
            &format!("mycel_tcp_connections_opened_total{{{PAIR}}} 1\n"),
        )]);
        assert!(quiet.rates_since(Some(&before))[0]
            .failures_per_second
            .is_sign_positive());
    }

    #[test]
    fn a_node_that_restarted_counts_from_zero_not_against_the_others() {
        let line = |n: u32| format!("mycel_tcp_connections_opened_total{{{PAIR}}} {n}\n");
        let mut before = scrape(&[("n1", &line(1000)), ("n2", &line(200))]);
        before.taken -= Duration::from_secs(1);
        // n1 restarted (1000 -> 3), n2 went on (200 -> 260): 63 new connections.
        let now = scrape(&[("n1", &line(3)), ("n2", &line(260))]);
        let p = &now.rates_since(Some(&before))[0];
        assert!((p.connections_per_second - 63.0).abs() < 1.0, "{p:?}");
        assert_eq!(p.connections_total, 263.0);
    }

    #[test]
    fn a_node_missing_from_the_earlier_scrape_has_no_rate() {
        let line = |n: u32| format!("mycel_tcp_connections_opened_total{{{PAIR}}} {n}\n");
        let mut before = scrape(&[("n1", &line(100))]);
        before.taken -= Duration::from_secs(1);
        // n2 failed (or joined) before: its 10 million since start are not one second's.
        let now = scrape(&[("n1", &line(110)), ("n2", &line(10_000_000))]);
        let p = &now.rates_since(Some(&before))[0];
        assert!((p.connections_per_second - 10.0).abs() < 0.5, "{p:?}");
        assert_eq!(p.connections_total, 10_000_110.0);
    }

    #[test]
    fn values_that_are_not_numbers_are_left_out() {
        let s = scrape(&[("n1", &format!("mycel_tcp_connections_opened_total{{{PAIR}}} NaN\nmycel_tcp_connections_open{{{PAIR}}} +Inf\n"))]);
        assert!(s.rates_since(None).is_empty());
    }

    #[test]
    fn a_node_named_twice_is_scraped_once() {
        let names = ["a:1".to_owned(), "b:2".to_owned(), "a:1".to_owned()];
        assert_eq!(distinct(&names), ["a:1", "b:2"]);
    }
}
