//! Rate limits at the destination: new connections per interval for each endpoint a
//! TrafficPolicy's `rateLimit` protects, counted by the endpoint's node.
//!
//! A token bucket per (policy, workload): `connections` tokens, all of them back over one
//! `interval`, so a burst of `connections` passes and then one more every
//! `interval / connections`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use mesh_model::{traffic::RateLimit, ObjectKey};

use crate::workloads::WorkloadId;

/// Buckets not touched for this long are dropped when the map grows, so deleted policies and
/// workloads do not stay.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
const PRUNE_ABOVE: usize = 4096;

#[derive(Default)]
pub struct RateLimits {
    buckets: Mutex<HashMap<(ObjectKey, WorkloadId), Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// The limit the tokens were counted under; a changed limit starts a full bucket.
    limit: RateLimit,
}

impl RateLimits {
    /// Takes a token for a new connection to `workload` from the bucket of each of `limits`
    /// (a policy and its limit, each once), or from none of them: the first that has none
    /// left is returned, and the others keep theirs.
    pub fn admit<'a>(
        &self,
        workload: &WorkloadId,
        limits: &[(&'a ObjectKey, RateLimit)],
    ) -> Result<(), (&'a ObjectKey, RateLimit)> {
        self.admit_at(workload, limits, Instant::now())
    }

    fn admit_at<'a>(
        &self,
        workload: &WorkloadId,
        limits: &[(&'a ObjectKey, RateLimit)],
        now: Instant,
    ) -> Result<(), (&'a ObjectKey, RateLimit)> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < FORGET_AFTER);
        }
        for (policy, limit) in limits {
            let bucket = buckets
                .entry(((*policy).clone(), workload.clone()))
                .or_insert_with(|| Bucket::full(*limit, now));
            bucket.refill(*limit, now);
            if bucket.tokens < 1.0 {
                return Err((policy, *limit));
            }
        }
        for (policy, _) in limits {
            if let Some(b) = buckets.get_mut(&((*policy).clone(), workload.clone())) {
                b.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

impl Bucket {
    fn full(limit: RateLimit, now: Instant) -> Self {
        Self {
            tokens: f64::from(limit.connections),
            at: now,
            limit,
        }
    }

    /// The tokens that came back since the last look; a changed limit starts full.
    fn refill(&mut self, limit: RateLimit, now: Instant) {
        if self.limit != limit {
            *self = Self::full(limit, now);
            return;
        }
        let full = f64::from(limit.connections);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let per_second = full / limit.interval.as_secs_f64().max(0.001);
        self.tokens = (self.tokens + elapsed * per_second).min(full);
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_one_per_share_of_the_interval() {
        let limits = RateLimits::default();
        let policy = ObjectKey::new("shop", "tp");
        let (a, b) = (WorkloadId::new("shop", "a"), WorkloadId::new("shop", "b"));
        let limit = RateLimit {
            connections: 5,
            interval: Duration::from_secs(1),
        };
        let one = [(&policy, limit)];
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limits.admit_at(&a, &one, t0).is_ok());
        }
        assert!(limits.admit_at(&a, &one, t0).is_err());
        // Another workload has its own bucket.
        assert!(limits.admit_at(&b, &one, t0).is_ok());
        // A fifth of the interval later, one more.
        let later = t0 + Duration::from_millis(210);
        assert!(limits.admit_at(&a, &one, later).is_ok());
        assert!(limits.admit_at(&a, &one, later).is_err());
        // A changed limit starts full.
        let raised = [(
            &policy,
            RateLimit {
                connections: 2,
                ..limit
            },
        )];
        assert!(limits.admit_at(&a, &raised, later).is_ok());
        assert!(limits.admit_at(&a, &raised, later).is_ok());
        assert!(limits.admit_at(&a, &raised, later).is_err());
    }

    /// Regression (review of issue 22): a connection charged one bucket once per Service that
    /// led to the workload, and a refusal by a second limit still cost the first a token.
    #[test]
    fn all_or_nothing_across_limits() {
        let limits = RateLimits::default();
        let (wide, tight) = (
            ObjectKey::new("shop", "wide"),
            ObjectKey::new("shop", "tight"),
        );
        let a = WorkloadId::new("shop", "a");
        let per = |n| RateLimit {
            connections: n,
            interval: Duration::from_secs(60),
        };
        let both = [(&wide, per(3)), (&tight, per(1))];
        let t0 = Instant::now();
        assert!(limits.admit_at(&a, &both, t0).is_ok());
        assert_eq!(
            limits.admit_at(&a, &both, t0).err().map(|(k, _)| k),
            Some(&tight)
        );
        // The refusal took nothing from `wide`: two left there.
        let only_wide = [(&wide, per(3))];
        assert!(limits.admit_at(&a, &only_wide, t0).is_ok());
        assert!(limits.admit_at(&a, &only_wide, t0).is_ok());
        assert!(limits.admit_at(&a, &only_wide, t0).is_err());
    }
}
