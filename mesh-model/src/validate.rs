//! Checks and error shaping shared by the per-kind validation of `resource.rs` and `policy.rs`,
//! kept apart so that those two depend on it and not on each other.

use std::{collections::BTreeMap, fmt};

/// A Kubernetes-style DNS label: a-z, 0-9 and '-', not at either end, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(crate) fn check_label(field: &str, value: &str) -> Result<(), String> {
    if is_dns_label(value) {
        Ok(())
    } else {
        Err(format!(
            "{field}: {value:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
        ))
    }
}

pub(crate) fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    let ok = |s: &str, allow_empty: bool| {
        (allow_empty || !s.is_empty())
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    };
    for (k, v) in labels {
        if !ok(k, false) || !ok(v, true) {
            return Err(format!("{field}: {k:?}: {v:?} is not a valid label"));
        }
    }
    Ok(())
}

/// serde_yaml errors can span lines; the operator gets one.
pub(crate) fn one_line(e: &impl fmt::Display) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}
