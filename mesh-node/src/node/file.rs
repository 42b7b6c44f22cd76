//! Offline mode: re-applies the workloads file whenever its contents change.

use std::{borrow::Cow, future::Future, path::Path, time::Duration};

use super::Node;
use crate::workloads;

/// Runs until `stop` completes; returns the node for its shutdown. `applied` is the text in
/// force: compared with the file, never re-read, so a change made while the daemon was
/// starting is not taken for the applied text.
pub async fn follow(
    mut node: Node,
    file: &Path,
    mut applied: String,
    node_name: &str,
    interval: Duration,
    stop: impl Future<Output = ()>,
) -> Node {
    let mut tick = tokio::time::interval(interval);
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return node,
            _ = tick.tick() => {}
        }
        let read = std::fs::read_to_string(file);
        // An unreadable file counts as a change once, not on every tick; the text is copied
        // only when it changed.
        let seen = match &read {
            Ok(text) => Cow::Borrowed(text.as_str()),
            Err(e) => Cow::Owned(format!("unreadable: {e}")),
        };
        if seen == applied.as_str() {
            continue;
        }
        applied = seen.into_owned();
        let desired = match read {
            Ok(text) => workloads::parse(file, &text, node_name),
            Err(source) => Err(mesh_model::ConfigError::Read {
                path: file.to_path_buf(),
                source,
            }),
        };
        let outcome = match desired {
            Ok(desired) => node
                .apply_workloads(desired)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => {
                node.rejected();
                Err(e.into())
            }
        };
        match outcome {
            Ok(()) => tracing::info!(enrolled = node.enrolled(), "workloads file applied"),
            Err(e) => {
                tracing::error!("workloads file rejected, keeping the previous workloads: {e:#}")
            }
        }
    }
}
