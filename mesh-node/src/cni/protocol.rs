//! What the plugin and the daemon say to each other on the daemon's Unix socket: one JSON
//! request line, one JSON reply line, then the connection closes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The pod the runtime is setting up or tearing down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// The pod's network is up in `netns` (a path as the host sees it); capture it now if it
    /// is in the mesh, and answer only once it is.
    Add {
        pod: PodRef,
        container_id: String,
        netns: PathBuf,
    },
    /// The pod's sandbox is going away.
    Del { pod: PodRef, container_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Captured: connections the pod makes from now on go through the node proxy.
    Enrolled {
        workload: String,
    },
    /// Not in the mesh; the pod runs uncaptured.
    NotInMesh,
    Removed,
    /// The pod must not start: the runtime fails the sandbox and retries.
    Error {
        message: String,
    },
}

/// The longest request line the daemon reads; anything longer is not the plugin.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// How long the daemon waits for the request line.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The request in one line the plugin sent, or why it is not one, on one line: the reason
/// can quote the sender's text (an unknown command, say), whose control characters are
/// escaped so that it cannot add lines to the log or the reply (found by the `cni_request`
/// fuzz target).
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str::<Request>(line).map_err(|e| {
        let reason: String = e
            .to_string()
            .chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect();
        format!("bad request: {reason}")
    })
}

/// How long the plugin waits for the daemon's answer: long enough for the daemon to see a
/// new pod in its watch and enroll it, short of the runtime's own request timeout.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_request_is_refused_on_one_line() {
        let reason = parse_request("[\"c\\n/[\"cn\\/").unwrap_err();
        assert!(!reason.contains('\n'), "{reason}");
        let reason = parse_request("{\"command\":\"a\\nb\"}").unwrap_err();
        assert!(
            !reason.contains('\n') && reason.contains("a\\nb"),
            "{reason}"
        );
        assert!(matches!(
            parse_request(
                r#"{"command":"del","pod":{"namespace":"a","name":"b","uid":"c"},"container_id":"x"}"#
            ),
            Ok(Request::Del { .. })
        ));
    }
}
