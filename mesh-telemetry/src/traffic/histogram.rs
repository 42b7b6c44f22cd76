//! Quantiles from a Prometheus histogram's cumulative buckets, as PromQL's
//! `histogram_quantile` has them: linear within the bucket the rank falls in.

/// The `q` quantile of `buckets` (upper bound `le`, cumulative count), sorted by `le` and
/// ending with `+Inf`; none when nothing was observed.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    // NaN as well as nothing observed.
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let i = buckets.iter().position(|(_, count)| *count >= rank)?;
    let (le, count) = buckets[i];
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    if le.is_infinite() {
        // Above the highest finite bound: that bound is all that is known (and with no finite
        // bound, nothing is).
        return (i > 0).then_some(lower);
    }
    let inside = count - below;
    if inside <= 0.0 {
        return Some(le);
    }
    Some(lower + (le - lower) * (rank - below) / inside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_within_the_bucket() {
        let b = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (f64::INFINITY, 20.0)];
        let near = |q: f64, want: f64| {
            let got = quantile(q, &b).unwrap();
            assert!((got - want).abs() < 1e-12, "{q}: {got}, not {want}");
        };
        near(0.5, 0.2);
        near(0.25, 0.15);
        near(0.75, 0.3);
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &[(0.1, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.1)
        );
        assert_eq!(quantile(0.5, &[]), None);
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 4.0)]), None);
    }
}
