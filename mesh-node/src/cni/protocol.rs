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

/// How long the plugin waits for the daemon's answer: long enough for the daemon to see a
/// new pod in its watch and enroll it, short of the runtime's own request timeout.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
