//! The retry budget of one Service port at one source node: retries may add at most a
//! percentage to the requests of the last [`WINDOW`], or a floor per second whatever the
//! traffic, so that when every endpoint fails, retries cannot multiply the load on them.
//!
//! Requests and retries are counted in two consecutive windows; the previous one is weighted
//! by how much of it still falls in the last [`WINDOW`] (a sliding window, approximated).
//!
//! [`KeptBodies`] is the node's other budget for retries: the memory that request bodies
//! kept for another try may take, all pods and Services together.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_model::traffic::Retries;

pub const WINDOW: Duration = Duration::from_secs(10);

/// Bytes of request bodies the node keeps for retries at once. A body that would pass it is
/// sent once, not kept: a stranger's uploads cannot make the node hold more than this.
pub const KEPT_BODIES_BYTES: usize = 64 * 1024 * 1024;

/// One pod's share of [`KEPT_BODIES_BYTES`]: a pod that stalls its uploads cannot turn off
/// retries for the others.
pub const KEPT_BODIES_PER_POD: usize = 8 * 1024 * 1024;

/// The bytes of request bodies kept for another try, node-wide.
#[derive(Debug, Default)]
pub struct KeptBodies {
    used: Arc<AtomicUsize>,
}

/// `n` bytes of a count, given back on drop.
#[derive(Debug)]
pub struct Kept {
    used: Arc<AtomicUsize>,
    n: usize,
}

impl Kept {
    /// `n` of `used`, if that stays within `limit`.
    fn take(used: &Arc<AtomicUsize>, n: usize, limit: usize) -> Option<Self> {
        used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
            u.checked_add(n).filter(|t| *t <= limit)
        })
        .ok()
        .map(|_| Self {
            used: used.clone(),
            n,
        })
    }
}

impl KeptBodies {
    /// Room for a body of `n` bytes from the pod whose kept bytes are `pod`, if the pod's
    /// share and the node have it; both are given back when the pair drops.
    pub fn take(&self, n: usize, pod: &Arc<AtomicUsize>) -> Option<(Kept, Kept)> {
        let of_pod = Kept::take(pod, n, KEPT_BODIES_PER_POD)?;
        let of_node = Kept::take(&self.used, n, KEPT_BODIES_BYTES)?;
        Some((of_pod, of_node))
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct RetryBudget {
    counts: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    started: Instant,
    /// (requests, retries) in the current and the previous window.
    current: (u64, u64),
    previous: (u64, u64),
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl RetryBudget {
    fn new(now: Instant) -> Self {
        Self {
            counts: Mutex::new(Counts {
                started: now,
                current: (0, 0),
                previous: (0, 0),
            }),
        }
    }

    /// Counts a request (its first try).
    pub fn requested(&self) {
        self.requested_at(Instant::now());
    }

    /// Whether another try is within `retries`' budget; counts it when it is.
    pub fn retry(&self, retries: &Retries) -> bool {
        self.retry_at(retries, Instant::now())
    }

    fn requested_at(&self, now: Instant) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.roll(now);
        c.current.0 += 1;
    }

    fn retry_at(&self, retries: &Retries, now: Instant) -> bool {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.roll(now);
        let (requests, spent) = c.in_window(now);
        let by_share = requests * f64::from(retries.budget_percent) / 100.0;
        let floor = f64::from(retries.min_retries_per_second) * WINDOW.as_secs_f64();
        if spent + 1.0 > by_share.max(floor) {
            return false;
        }
        c.current.1 += 1;
        true
    }
}

impl Counts {
    fn roll(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.started);
        if age >= WINDOW * 2 {
            self.previous = (0, 0);
            self.current = (0, 0);
            self.started = now;
        } else if age >= WINDOW {
            self.previous = self.current;
            self.current = (0, 0);
            self.started += WINDOW;
        }
    }

    /// Requests and retries in the last [`WINDOW`].
    fn in_window(&self, now: Instant) -> (f64, f64) {
        let into = now.saturating_duration_since(self.started).as_secs_f64() / WINDOW.as_secs_f64();
        let left = (1.0 - into).clamp(0.0, 1.0);
        (
            self.current.0 as f64 + self.previous.0 as f64 * left,
            self.current.1 as f64 + self.previous.1 as f64 * left,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retries(percent: u32, per_second: u32) -> Retries {
        Retries {
            budget_percent: percent,
            min_retries_per_second: per_second,
            ..Retries::default()
        }
    }

    #[test]
    fn retries_stay_within_their_share_of_the_requests() {
        let t0 = Instant::now();
        let b = RetryBudget::new(t0);
        let r = retries(20, 0);
        let mut granted = 0;
        for i in 0..1000 {
            b.requested_at(t0);
            if b.retry_at(&r, t0 + Duration::from_millis(i)) {
                granted += 1;
            }
        }
        // Every request failed and asked for a retry: a fifth of them got one.
        assert_eq!(granted, 200);
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry_and_the_window_slides() {
        let t0 = Instant::now();
        let b = RetryBudget::new(t0);
        let r = retries(20, 1);
        // No traffic to speak of: ten retries in the window (1 per second).
        let granted = (0..50).filter(|_| b.retry_at(&r, t0)).count();
        assert_eq!(granted, 10);
        // Half a window on, half of those still count.
        let later = t0 + WINDOW + WINDOW / 2;
        let granted = (0..50).filter(|_| b.retry_at(&r, later)).count();
        assert_eq!(granted, 5);
        // Two windows of nothing forget everything.
        let much_later = later + WINDOW * 3;
        assert!(b.retry_at(&r, much_later));
        // No budget at all: nothing.
        let none = RetryBudget::new(t0);
        assert!(!none.retry_at(&retries(0, 0), t0));
    }

    #[test]
    fn kept_bodies_stop_at_the_pods_share_and_the_node_budget_and_come_back() {
        let kept = KeptBodies::default();
        let pods: Vec<Arc<AtomicUsize>> = (0..9).map(|_| Arc::default()).collect();
        // One pod alone stops at its share, and leaves the rest to the others.
        let greedy = kept.take(KEPT_BODIES_PER_POD, &pods[0]).unwrap();
        assert!(kept.take(1, &pods[0]).is_none());
        let others: Vec<_> = pods[1..8]
            .iter()
            .map(|p| kept.take(KEPT_BODIES_PER_POD, p).unwrap())
            .collect();
        // The node is full: a ninth pod gets nothing, and its share is untouched.
        assert!(kept.take(1, &pods[8]).is_none());
        assert_eq!(pods[8].load(Ordering::Relaxed), 0);
        drop((greedy, others));
        assert!(kept.take(KEPT_BODIES_PER_POD, &pods[8]).is_some());
        assert!(kept.take(usize::MAX, &pods[8]).is_none());
        assert_eq!(pods[8].load(Ordering::Relaxed), 0);
    }
}
