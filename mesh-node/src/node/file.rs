//! Offline mode: re-applies the workloads file whenever its contents change.

use std::{future::Future, path::Path, time::Duration};

use mesh_daemon::follow::Follower;

use super::Node;
use crate::{handoff::gate::Phase, workloads};

/// Runs until `stop` completes; returns the node for its shutdown. `applied` is the text in
/// force: compared with the file, never re-read, so a change made while the daemon was
/// starting is not taken for the applied text.
pub async fn follow(
    mut node: Node,
    file: &Path,
    applied: String,
    node_name: &str,
    interval: Duration,
    stop: impl Future<Output = ()>,
) -> Node {
    let path = file.to_path_buf();
    let mut follower = Follower::new(interval, applied, move || std::fs::read_to_string(&path));
    let mut stop = std::pin::pin!(stop);
    let gate = node.gate();
    loop {
        // An unreadable file is one change, rejected like a bad one.
        let desired = tokio::select! {
            () = &mut stop => return node,
            // A new daemon starts up on this one's sockets: nothing is applied meanwhile.
            () = gate.reached(Phase::Pausing) => {
                // Idle now (nothing half applied): the old daemon may offer its sockets.
                gate.set(Phase::Paused);
                tokio::select! {
                    () = &mut stop => return node,
                    () = gate.resumed() => continue,
                }
            },
            seen = follower.changed() => match seen {
                Ok(text) => workloads::parse(file, text, node_name),
                Err(source) => Err(mesh_model::ConfigError::Read {
                    path: file.to_path_buf(),
                    source,
                }),
            },
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
