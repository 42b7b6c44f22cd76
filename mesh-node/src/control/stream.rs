//! The config stream session loop: connect, take the snapshot, apply each update, acknowledge,
//! and reconnect with backoff when the stream breaks.

use std::{sync::Arc, time::Duration};

use mesh_api::v1::ConfigAck;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{Backoff, CpClient, MeshView};

/// A request to apply one version of the config (`node/`); the answer is `Err(reason)` when
/// it could not be applied whole (the node keeps the previous set of pods and retries), and
/// is what the acknowledgement carries.
pub struct ApplyRequest {
    pub view: Arc<MeshView>,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Runs until the process ends. Each view it builds
/// goes to the node through `apply`, and is acknowledged once the node has applied it.
pub async fn run(
    client: CpClient,
    apply: mpsc::Sender<ApplyRequest>,
    connected: watch::Sender<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let outcome = session(&client, &apply, &connected, &mut backoff).await;
        connected.send_replace(false);
        let delay = backoff.step();
        match outcome {
            Ok(()) => {
                tracing::warn!(retry_in = ?delay, "control plane closed the config stream; keeping the last config")
            }
            Err(e) => {
                tracing::warn!(retry_in = ?delay, "control plane unavailable, keeping the last config: {e}")
            }
        }
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    client: &CpClient,
    apply: &mpsc::Sender<ApplyRequest>,
    connected: &watch::Sender<bool>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let mut api = client.api().map_err(|e| e.to_string())?;
    let (ack_tx, ack_rx) = mpsc::channel(4);
    let mut updates = api
        .stream_config(ReceiverStream::new(ack_rx))
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    // The base the next diff applies to; a new stream starts from its own snapshot.
    let mut base = MeshView::default();
    // A version too large for one message comes in parts, applied together.
    let mut parts = mesh_api::parts::Assembler::default();
    loop {
        let part = match updates.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(()),
            Err(s) => return Err(describe(&s)),
        };
        let update = match parts.push(part) {
            Ok(Some(whole)) => whole,
            Ok(None) => continue,
            Err(e) => return Err(format!("broken config stream: {e}")),
        };
        let version = update.version;
        let snapshot = update.snapshot;
        let error = match base.apply(update) {
            Ok(next) => {
                base = next;
                if snapshot {
                    connected.send_replace(true);
                    backoff.reset();
                    tracing::info!(
                        version,
                        workloads = base.workloads.len(),
                        services = base.services.len(),
                        "config snapshot received"
                    );
                } else {
                    tracing::info!(version, "config update received");
                }
                enroll(apply, Arc::new(base.clone())).await
            }
            Err(e) => {
                tracing::error!(version, "config update rejected: {e}");
                if snapshot {
                    // Without a usable snapshot there is no base for what follows.
                    return Err(format!("unusable snapshot: {e}"));
                }
                e
            }
        };
        let ack = ConfigAck { version, error };
        if ack_tx.send(ack).await.is_err() {
            return Err("the stream's send side closed".into());
        }
    }
}

async fn enroll(apply: &mpsc::Sender<ApplyRequest>, view: Arc<MeshView>) -> String {
    let (done, answer) = oneshot::channel();
    if apply.send(ApplyRequest { view, done }).await.is_err() {
        return "the node is shutting down".into();
    }
    match answer.await {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => e,
        Err(_) => "the node is shutting down".into(),
    }
}

fn describe(status: &tonic::Status) -> String {
    // Connection failures carry the useful part in the source chain, not the message.
    let mut out = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}
