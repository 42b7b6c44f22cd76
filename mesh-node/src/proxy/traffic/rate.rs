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
    /// Takes a token for a new connection to `workload` under `policy`'s `limit`; false when
    /// there is none left.
    pub fn admit(&self, policy: &ObjectKey, workload: &WorkloadId, limit: RateLimit) -> bool {
        self.admit_at(policy, workload, limit, Instant::now())
    }

    fn admit_at(
        &self,
        policy: &ObjectKey,
        workload: &WorkloadId,
        limit: RateLimit,
        now: Instant,
    ) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < FORGET_AFTER);
        }
        let full = f64::from(limit.connections);
        let bucket = buckets
            .entry((policy.clone(), workload.clone()))
            .or_insert(Bucket {
                tokens: full,
                at: now,
                limit,
            });
        if bucket.limit != limit {
            *bucket = Bucket {
                tokens: full,
                at: now,
                limit,
            };
        }
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        let per_second = full / limit.interval.as_secs_f64().max(0.001);
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(full);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
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
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limits.admit_at(&policy, &a, limit, t0));
        }
        assert!(!limits.admit_at(&policy, &a, limit, t0));
        // Another workload has its own bucket.
        assert!(limits.admit_at(&policy, &b, limit, t0));
        // A fifth of the interval later, one more.
        let later = t0 + Duration::from_millis(210);
        assert!(limits.admit_at(&policy, &a, limit, later));
        assert!(!limits.admit_at(&policy, &a, limit, later));
        // A changed limit starts full.
        let raised = RateLimit {
            connections: 2,
            ..limit
        };
        assert!(limits.admit_at(&policy, &a, raised, later));
        assert!(limits.admit_at(&policy, &a, raised, later));
        assert!(!limits.admit_at(&policy, &a, raised, later));
    }
}
