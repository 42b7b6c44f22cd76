//! Durations as operators write them: `45s`, `20m`, `24h`, `7d`, or a combination like `1h30m`.

use std::time::Duration;

/// Parses a duration made of `<integer><unit>` parts, units `s`, `m`, `h`, `d`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 45s, 20m, 24h or 1h30m");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// The shortest string that [`parse`] reads back as `d` (whole seconds).
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "h", "10", "10x", "1.5h", "-1h", "99999999999999999999d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_what_it_parses() {
        for s in ["45s", "1d", "1h30m", "1d2h3m4s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
