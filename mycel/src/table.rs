//! Columns aligned for a terminal, and how long ago or from now a time is.

use std::time::{Duration, SystemTime};

/// `header` and `rows` with each column as wide as its widest cell, two spaces apart.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `d` in the largest two units: `3d4h`, `2h5m`, `4m10s`, `12s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match () {
        _ if days > 0 => format!("{days}d{hours}h"),
        _ if hours > 0 => format!("{hours}h{minutes}m"),
        _ if minutes > 0 => format!("{minutes}m{seconds}s"),
        _ => format!("{seconds}s"),
    }
}

/// How far `t` is from now: `in 5m2s` or `3s ago`.
pub fn from_now(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => format!("in {}", duration(ahead)),
        Err(e) => format!("{} ago", duration(e.duration())),
    }
}

/// An RFC 3339 time as mesh-cp's JSON carries it.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = render(
            &["NODE", "VERSION"],
            &[
                vec!["n1".into(), "12".into()],
                vec!["node-two".into(), "3".into()],
            ],
        );
        assert_eq!(t, "NODE      VERSION\nn1        12\nnode-two  3\n");
    }

    #[test]
    fn durations_in_two_units() {
        assert_eq!(duration(Duration::from_secs(12)), "12s");
        assert_eq!(duration(Duration::from_secs(250)), "4m10s");
        assert_eq!(duration(Duration::from_secs(7_500)), "2h5m");
        assert_eq!(duration(Duration::from_secs(273_600)), "3d4h");
    }

    #[test]
    fn times_read_back() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_547_950);
        assert_eq!(parse_time(&mesh_daemon::time::rfc3339(t)), Some(t));
        assert_eq!(parse_time("yesterday"), None);
    }
}
