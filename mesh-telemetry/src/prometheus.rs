//! Instant queries to a Prometheus server: what `mycel stat --prometheus` reads (and what the
//! tests check the dashboard's queries with).

use crate::client::{self, ClientError};

use crate::exposition::Labels;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Http(#[from] ClientError),
    #[error("Prometheus at {addr} refused {promql}: {answer}")]
    Refused {
        addr: String,
        promql: String,
        answer: String,
    },
    #[error("Prometheus at {addr} answered {promql} with JSON I cannot read: {source}")]
    Json {
        addr: String,
        promql: String,
        source: serde_json::Error,
    },
}

/// `GET /api/v1/query` on the server at `addr`: each series' labels and value (NaN where the
/// value is not a number).
pub fn query(addr: &str, promql: &str) -> Result<Vec<(Labels, f64)>, QueryError> {
    let path = format!("/api/v1/query?query={}", percent_encode(promql));
    let (code, body) = client::get(addr, &path)?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|source| QueryError::Json {
        addr: addr.to_owned(),
        promql: promql.to_owned(),
        source,
    })?;
    if code != 200 || v["status"] != "success" {
        return Err(QueryError::Refused {
            addr: addr.to_owned(),
            promql: promql.to_owned(),
            answer: format!(
                "{code} {}",
                v["error"]
                    .as_str()
                    .unwrap_or(body.trim())
                    .chars()
                    .take(300)
                    .collect::<String>()
            ),
        });
    }
    let series = v["data"]["result"].as_array().cloned().unwrap_or_default();
    Ok(series
        .iter()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (labels, value)
        })
        .collect())
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_all_but_unreserved() {
        assert_eq!(
            percent_encode("rate(a{b=\"c\"}[1m])"),
            "rate%28a%7Bb%3D%22c%22%7D%5B1m%5D%29"
        );
    }
}
