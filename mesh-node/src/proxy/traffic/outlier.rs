//! One endpoint's connect history at one source node: the streak of failures that ejects it,
//! and how long it stays out.
//!
//! Only connect failures count (refused, timed out, a tunnel that could not be made, the
//! destination's application refusing): a policy deny, a rate limit or a limit at the
//! destination says nothing about the endpoint's health and is never recorded here.

use std::time::{Duration, Instant};

use mesh_model::traffic::OutlierDetection;

#[derive(Debug, Default)]
pub struct Outlier {
    /// Failures in a row, none further apart than the interval.
    streak: u32,
    last_failure: Option<Instant>,
    /// Out from `.0` until `.1`.
    ejected: Option<(Instant, Instant)>,
    /// Ejections in a row, for the next ejection's length; decays while the endpoint behaves.
    times: u32,
}

impl Outlier {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected.is_some_and(|(_, until)| until > now)
    }

    /// Brings an ejection in line with the settings in force now: none when ejection is off,
    /// and none longer than the maximum (a policy change can end a bad ejection early).
    pub fn follow(&mut self, od: &OutlierDetection) {
        if od.consecutive_failures == 0 {
            self.ejected = None;
            self.streak = 0;
        } else if let Some((at, until)) = self.ejected {
            self.ejected = Some((at, until.min(at + od.max_ejection_time)));
        }
    }

    pub fn succeeded(&mut self) {
        self.streak = 0;
    }

    /// Records a failure; when it completes a streak and `may_eject` agrees (the Service's cap
    /// on ejections), ejects the endpoint and returns for how long. Failures while it is
    /// ejected (it still gets connections in panic mode) do not count towards the next one.
    pub fn failed(
        &mut self,
        now: Instant,
        od: &OutlierDetection,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if od.consecutive_failures == 0 || self.is_ejected(now) {
            return None;
        }
        if self
            .last_failure
            .is_some_and(|t| now.saturating_duration_since(t) > od.interval)
        {
            self.streak = 0;
        }
        self.streak = self.streak.saturating_add(1);
        self.last_failure = Some(now);
        if self.streak < od.consecutive_failures || !may_eject() {
            return None;
        }
        self.times = self.decayed_times(now, od) + 1;
        let length = od.ejection_time(self.times);
        self.ejected = Some((now, now + length));
        self.streak = 0;
        Some(length)
    }

    /// Ejections in a row, less one for each interval the endpoint has been back without
    /// being ejected again.
    fn decayed_times(&self, now: Instant, od: &OutlierDetection) -> u32 {
        let Some((_, back)) = self.ejected else {
            return 0;
        };
        let since = now.saturating_duration_since(back);
        let intervals = since.as_millis() / od.interval.as_millis().max(1);
        self.times
            .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn od() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(75),
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn a_streak_ejects_for_longer_each_time_and_decays() {
        let od = od();
        let t0 = Instant::now();
        let mut o = Outlier::default();
        assert_eq!(o.failed(t0, &od, || true), None);
        assert_eq!(o.failed(t0, &od, || true), None);
        assert_eq!(o.failed(t0, &od, || true), Some(Duration::from_secs(30)));
        assert!(o.is_ejected(t0 + Duration::from_secs(29)));
        // Failures while out do not count.
        assert_eq!(o.failed(t0 + Duration::from_secs(29), &od, || true), None);
        assert!(!o.is_ejected(t0 + Duration::from_secs(30)));
        // Back, and failing again at once: the second ejection is twice as long.
        let t1 = t0 + Duration::from_secs(31);
        for _ in 0..2 {
            assert_eq!(o.failed(t1, &od, || true), None);
        }
        assert_eq!(o.failed(t1, &od, || true), Some(Duration::from_secs(60)));
        // The third would be 90 s: capped at the maximum.
        let t2 = t1 + Duration::from_secs(61);
        for _ in 0..2 {
            o.failed(t2, &od, || true);
        }
        assert_eq!(o.failed(t2, &od, || true), Some(Duration::from_secs(75)));
        // A long good spell: back to the base time.
        let t3 = t2 + Duration::from_secs(75 + 1000);
        for _ in 0..2 {
            o.failed(t3, &od, || true);
        }
        assert_eq!(o.failed(t3, &od, || true), Some(Duration::from_secs(30)));
    }

    #[test]
    fn successes_and_gaps_break_the_streak_and_the_cap_holds() {
        let od = od();
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.failed(t0, &od, || true);
        o.failed(t0, &od, || true);
        o.succeeded();
        assert_eq!(o.failed(t0, &od, || true), None);
        o.failed(t0, &od, || true);
        // Further apart than the interval: the streak starts over.
        let late = t0 + Duration::from_secs(11);
        assert_eq!(o.failed(late, &od, || true), None);
        o.failed(late, &od, || true);
        // The Service's cap refuses: not ejected, and the next failure asks again.
        assert_eq!(o.failed(late, &od, || false), None);
        assert!(!o.is_ejected(late));
        let off = OutlierDetection {
            consecutive_failures: 0,
            ..od
        };
        for _ in 0..10 {
            assert_eq!(o.failed(late, &off, || true), None);
        }
    }

    /// Regression (review of issue 22): an ejection outlived the policy that made it.
    #[test]
    fn a_policy_change_ends_or_shortens_an_ejection() {
        let od = od();
        let t0 = Instant::now();
        let mut o = Outlier::default();
        for _ in 0..3 {
            o.failed(t0, &od, || true);
        }
        assert!(o.is_ejected(t0 + Duration::from_secs(20)));
        o.follow(&OutlierDetection {
            max_ejection_time: Duration::from_secs(10),
            ..od
        });
        assert!(!o.is_ejected(t0 + Duration::from_secs(11)));
        for _ in 0..3 {
            o.failed(t0 + Duration::from_secs(12), &od, || true);
        }
        assert!(o.is_ejected(t0 + Duration::from_secs(13)));
        o.follow(&OutlierDetection {
            consecutive_failures: 0,
            ..od
        });
        assert!(!o.is_ejected(t0 + Duration::from_secs(13)));
    }
}
