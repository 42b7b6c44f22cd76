//! Connected mode: the control plane's config stream decides what is enrolled (in Kubernetes,
//! this node's pods do); certificates are kept current alongside. A set that fails to enroll
//! is retried every few seconds.

use std::{future::Future, time::Duration};

use tokio::sync::{mpsc, watch};

use super::Node;
use crate::{control, handoff::gate::Phase, identity, kubernetes};

/// Runs until `stop` completes or the stream's task is gone; returns the node for its
/// shutdown.
/// With `lookups` (on demand), the proxy's lookups go to the control plane on the stream.
pub async fn follow(
    mut node: Node,
    client: control::CpClient,
    local: Option<kubernetes::Local>,
    lookups: Option<mpsc::Receiver<control::Lookup>>,
    stop: impl Future<Output = ()>,
) -> Node {
    let (apply_tx, mut apply_rx) = mpsc::channel(1);
    let (connected_tx, mut connected_rx) = watch::channel(false);
    tokio::spawn(control::run_stream(
        client.clone(),
        apply_tx,
        connected_tx,
        lookups,
    ));
    tokio::spawn(identity::run_manager(client, node.view(), node.svids()));
    let (mut requests, mut pods_changed) = match local {
        Some(l) => {
            node.follow_pods(l.pods);
            (Some(l.requests), Some(l.changed))
        }
        None => (None, None),
    };
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut stop = std::pin::pin!(stop);
    let gate = node.gate();
    loop {
        tokio::select! {
            () = &mut stop => return node,
            // A new daemon starts up on this one's sockets: nothing is applied meanwhile
            // (config versions and pod changes wait; the kernel maps have one writer).
            () = gate.reached(Phase::Pausing) => {
                // Idle now (nothing half applied): the old daemon may offer its sockets.
                gate.set(Phase::Paused);
                tokio::select! {
                    () = &mut stop => return node,
                    () = gate.resumed() => {}
                }
            },
            req = apply_rx.recv() => {
                let Some(control::ApplyRequest { view, done }) = req else { return node };
                let _ = done.send(node.apply_version(view).await);
            }
            request = next_enroll_request(&mut requests) => {
                let Some(kubernetes::EnrollRequest { pod, done }) = request else { return node };
                let _ = done.send(node.enroll_pod(&pod).await);
            }
            () = local_change(&mut pods_changed) => node.pods_changed().await,
            _ = retry.tick(), if node.has_pending() => node.retry().await,
            changed = connected_rx.changed() => {
                if changed.is_ok() {
                    node.set_connected(*connected_rx.borrow_and_update());
                }
            }
        }
    }
}

/// The next request of the CNI socket; never, outside Kubernetes mode.
async fn next_enroll_request(
    requests: &mut Option<mpsc::Receiver<kubernetes::EnrollRequest>>,
) -> Option<kubernetes::EnrollRequest> {
    match requests {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Returns when this node's pods (or their netns) changed; never, outside Kubernetes mode.
async fn local_change(changed: &mut Option<watch::Receiver<u64>>) {
    match changed {
        Some(c) => {
            if c.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
