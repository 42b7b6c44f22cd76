//! `idleTimeout` and `maxConnectionDuration`: a watch beside an established connection that
//! closes it (both sides reset, as a policy change does) when it has moved no byte for the
//! idle timeout, or has lived its maximum. Only connections with either setting get one.
//!
//! The relay counts bytes but keeps no time (a clock read per copy would cost every
//! connection); the watch looks at the counts every eighth of the idle timeout, so a
//! connection closes between the idle timeout and an eighth more after its last byte.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::metrics::FailReason;

const NOT_EXPIRED: u8 = 0;
const IDLE: u8 = 1;
const MAX_DURATION: u8 = 2;

/// The watch of one connection; dropping it stops the watch.
pub struct Expiry {
    /// What the relay waits on: fires on expiry, and with the token it was made under.
    token: CancellationToken,
    reason: Arc<AtomicU8>,
    _stop: DropGuard,
}

impl Expiry {
    /// A watch for a connection whose byte counts are `totals`, under `within` (the policy
    /// or trust token the relay would otherwise wait on); `None` when neither limit is set.
    pub fn start(
        idle: Duration,
        max: Duration,
        totals: Arc<[AtomicU64; 2]>,
        within: Option<&CancellationToken>,
    ) -> Option<Self> {
        if idle.is_zero() && max.is_zero() {
            return None;
        }
        let token = within.map_or_else(CancellationToken::new, CancellationToken::child_token);
        let stop = CancellationToken::new();
        let reason = Arc::new(AtomicU8::new(NOT_EXPIRED));
        let watch = Watch {
            idle,
            max,
            totals,
            token: token.clone(),
            reason: reason.clone(),
        };
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stopped.cancelled() => {}
                () = watch.run() => {}
            }
        });
        Some(Self {
            token,
            reason,
            _stop: stop.drop_guard(),
        })
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why the watch closed the connection, if it did.
    pub fn expired(&self) -> Option<FailReason> {
        reason_of(&self.reason)
    }

    /// Resolves when the token fires: with the expiry's reason, or `None` when it was the
    /// token the watch was made under. Owns what it needs, so a task can hold it apart from
    /// the watch (which must still be alive for it to fire).
    pub fn fired(&self) -> impl std::future::Future<Output = Option<FailReason>> + Send + 'static {
        let (token, reason) = (self.token.clone(), self.reason.clone());
        async move {
            token.cancelled().await;
            reason_of(&reason)
        }
    }
}

fn reason_of(reason: &AtomicU8) -> Option<FailReason> {
    match reason.load(Ordering::Relaxed) {
        IDLE => Some(FailReason::IdleTimeout),
        MAX_DURATION => Some(FailReason::MaxDuration),
        _ => None,
    }
}

struct Watch {
    idle: Duration,
    max: Duration,
    totals: Arc<[AtomicU64; 2]>,
    token: CancellationToken,
    reason: Arc<AtomicU8>,
}

impl Watch {
    async fn run(self) {
        let start = Instant::now();
        let end = (!self.max.is_zero()).then(|| start + self.max);
        let moved = || {
            self.totals[0]
                .load(Ordering::Relaxed)
                .wrapping_add(self.totals[1].load(Ordering::Relaxed))
        };
        let mut last = moved();
        let mut last_at = start;
        let step = self.idle / 8;
        loop {
            let idle_at = (!self.idle.is_zero()).then(|| last_at + self.idle);
            let look =
                (!self.idle.is_zero()).then(|| (Instant::now() + step).min(last_at + self.idle));
            let wake = match (look, end) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => return,
            };
            tokio::select! {
                () = self.token.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            if end.is_some_and(|e| now >= e) {
                self.reason.store(MAX_DURATION, Ordering::Relaxed);
                self.token.cancel();
                return;
            }
            let now_moved = moved();
            if now_moved != last {
                (last, last_at) = (now_moved, now);
            } else if idle_at.is_some_and(|i| now >= i) {
                self.reason.store(IDLE, Ordering::Relaxed);
                self.token.cancel();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_and_busy_ones_live_to_their_maximum() {
        let totals: Arc<[AtomicU64; 2]> = Arc::default();
        let idle = Expiry::start(
            Duration::from_secs(10),
            Duration::ZERO,
            totals.clone(),
            None,
        )
        .unwrap();
        // Bytes at 5 s push the idle deadline to 15 s, give or take an eighth of the timeout.
        tokio::time::sleep(Duration::from_secs(5)).await;
        totals[0].fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!idle.token().is_cancelled());
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(!idle.token().is_cancelled() || idle.expired().is_some());
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(idle.token().is_cancelled(), "closed by 15 s + 1.25 s");
        assert_eq!(idle.expired(), Some(FailReason::IdleTimeout));

        let busy: Arc<[AtomicU64; 2]> = Arc::default();
        let parent = CancellationToken::new();
        let max = Expiry::start(
            Duration::from_secs(10),
            Duration::from_secs(30),
            busy.clone(),
            Some(&parent),
        )
        .unwrap();
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            busy[1].fetch_add(1, Ordering::Relaxed);
        }
        assert!(!max.token().is_cancelled());
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(max.expired(), Some(FailReason::MaxDuration));
        // The parent is untouched; a parent that fires closes the connection with no expiry.
        assert!(!parent.is_cancelled());
        let other =
            Expiry::start(Duration::ZERO, Duration::from_secs(60), busy, Some(&parent)).unwrap();
        parent.cancel();
        assert!(other.token().is_cancelled());
        assert_eq!(other.expired(), None);
        assert!(Expiry::start(Duration::ZERO, Duration::ZERO, Arc::default(), None).is_none());
    }
}
