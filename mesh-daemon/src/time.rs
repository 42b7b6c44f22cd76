//! Times as people and tools read them: RFC 3339 in UTC, in logs, JSON and tables alike.

use std::time::SystemTime;

/// `t` in RFC 3339, e.g. `2026-12-06T10:07:45.123456789Z`. A time outside the years 0 to 9999
/// (which RFC 3339 cannot write, and which may come from another program's answer) is written
/// as seconds from the Unix epoch instead.
pub fn rfc3339(t: SystemTime) -> String {
    let epoch = time::OffsetDateTime::UNIX_EPOCH;
    let at = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => time::Duration::try_from(after)
            .ok()
            .and_then(|d| epoch.checked_add(d)),
        Err(before) => time::Duration::try_from(before.duration())
            .ok()
            .and_then(|d| epoch.checked_sub(d)),
    };
    at.and_then(|at| {
        at.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("{}s after the Unix epoch", d.as_secs()),
        Err(e) => format!("{}s before the Unix epoch", e.duration().as_secs()),
    })
}

/// A serde `serialize_with` for an optional time: RFC 3339, or null.
pub fn serialize_rfc3339_opt<S: serde::Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// A serde `serialize_with` for a time: RFC 3339.
pub fn serialize_rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn prints_utc_with_a_z() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_547_950);
        assert_eq!(rfc3339(t), "2026-12-06T09:05:50Z");
    }

    #[test]
    fn a_time_past_year_9999_is_written_not_a_panic() {
        // 10000-01-01T04:59:59Z: what "9999-12-31T23:59:59-05:00" is in UTC.
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_318_799);
        assert_eq!(rfc3339(t), "253402318799s after the Unix epoch");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(rfc3339(before), "1969-12-31T00:00:00Z");
    }
}
