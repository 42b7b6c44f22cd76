//! Times as people and tools read them: RFC 3339 in UTC, in logs, JSON and tables alike.

use std::time::SystemTime;

/// `t` in RFC 3339, e.g. `2026-12-06T10:07:45.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
}
