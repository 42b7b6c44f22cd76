//! The config stream session loop: connect, take the snapshot, apply each update, acknowledge,
//! and reconnect with backoff when the stream breaks.

use std::{sync::Arc, time::Duration};

use mesh_api::{metadata, v1::ConfigAck};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    demand::{self, Asked, Lookup},
    jitter, Backoff, CpClient, MeshView,
};

/// A request to apply one version of the config (`node/`); the answer is `Err(reason)` when
/// it could not be applied whole (the node keeps the previous set of pods and retries), and
/// is what the acknowledgement carries.
pub struct ApplyRequest {
    pub view: Arc<MeshView>,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// What the node holds, kept across streams: a node that reconnects names its version and
/// the control plane's epoch, and is sent only what changed since when the control plane
/// still knows (a restart of mesh-cp, or a node too far behind, gets a snapshot).
#[derive(Default)]
struct Held {
    view: MeshView,
    /// The epoch `view` came from; none when it cannot be resumed from.
    epoch: Option<u64>,
    /// On demand: what the control plane was asked to watch.
    asked: Asked,
}

/// Runs until the process ends. Each view it builds
/// goes to the node through `apply`, and is acknowledged once the node has applied it. With
/// `lookups` (on demand), the proxy's lookups are asked of the control plane.
pub async fn run(
    client: CpClient,
    apply: mpsc::Sender<ApplyRequest>,
    connected: watch::Sender<bool>,
    mut lookups: Option<mpsc::Receiver<Lookup>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut held = Held {
        view: MeshView {
            on_demand: lookups.is_some(),
            ..MeshView::default()
        },
        ..Held::default()
    };
    // Sessions that failed since the last one that got going: while some address is left
    // untried, the next is tried at once.
    let mut failed_in_a_row = 0usize;
    loop {
        let began = tokio::time::Instant::now();
        let outcome = session(
            &client,
            &apply,
            &connected,
            &mut backoff,
            &mut held,
            &mut lookups,
        )
        .await;
        // A stream that answered and then ended at once (a replica that takes nodes and
        // drops them) counts as a failure, or nodes would bounce to it every few hundred ms.
        let got_going = connected.send_replace(false) && began.elapsed() >= LASTED;
        failed_in_a_row = if got_going { 1 } else { failed_in_a_row + 1 };
        let from = client.address().to_owned();
        let several = client.addresses() > 1;
        let to = if several { client.fail_over() } else { &from };
        let delay = if several && failed_in_a_row < client.addresses() {
            // Not at the same instant as every other node of a replica that went away.
            AT_ONCE + AT_ONCE.mul_f64(jitter())
        } else {
            backoff.step()
        };
        match outcome {
            Ok(Ended::Closed) => {
                tracing::warn!(cp = from, next = to, retry_in = ?delay, "control plane closed the config stream; keeping the last config")
            }
            Ok(Ended::Stopping) => {
                tracing::info!(cp = from, next = to, retry_in = ?delay, "control plane is shutting down (a restart or an upgrade); keeping the last config until it is back")
            }
            Err(e) => {
                tracing::warn!(cp = from, next = to, retry_in = ?delay, "control plane unavailable, keeping the last config: {e}")
            }
        }
        tokio::time::sleep(delay).await;
    }
}

/// How long a stream must have lasted to count as one that got going.
const LASTED: Duration = Duration::from_secs(5);

/// The pause before trying another control-plane address, before its jitter.
const AT_ONCE: Duration = Duration::from_millis(100);

/// How a config stream ended without a fault.
enum Ended {
    /// The control plane ended it without saying why.
    Closed,
    /// The control plane said it is stopping.
    Stopping,
}

async fn session(
    client: &CpClient,
    apply: &mpsc::Sender<ApplyRequest>,
    connected: &watch::Sender<bool>,
    backoff: &mut Backoff,
    held: &mut Held,
    lookups: &mut Option<mpsc::Receiver<Lookup>>,
) -> Result<Ended, String> {
    let mut api = client.api().map_err(|e| e.to_string())?;
    let (ack_tx, ack_rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(ReceiverStream::new(ack_rx));
    let resuming = held.epoch.filter(|_| held.view.version > 0);
    if let Some(epoch) = resuming {
        metadata::set_resume(&mut request, epoch, held.view.version);
    }
    if let Some(port) = client.metrics_port() {
        metadata::set_metrics_port(&mut request, port);
    }
    if held.view.on_demand {
        metadata::set_on_demand(&mut request);
        // First, whether resuming or not: a resumed stream is filtered by these, and a
        // snapshot answers them. A resumed one is asked again what was not answered (the
        // answer may have been lost with the last stream).
        let all = held.asked.all(&held.view, client.node());
        let again = resuming.and_then(|_| held.asked.unanswered());
        for message in std::iter::once(all).chain(again) {
            if ack_tx.send(message).await.is_err() {
                return Err("the stream's send side closed".into());
            }
        }
    }
    let mut updates = api
        .stream_config(request)
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    // A version too large for one message comes in parts, applied together.
    let mut parts = mesh_api::parts::Assembler::default();
    let mut first = true;
    loop {
        // Lookups are taken only while a message can be sent at once: the stream never
        // waits on the control plane to read them while updates wait to be read.
        let room = ack_tx.capacity() > 0;
        let next = tokio::select! {
            m = updates.message() => Ok(m),
            l = async { lookups.as_mut()?.recv().await }, if lookups.is_some() && room => Err(l),
        };
        let part = match next {
            Ok(Ok(Some(u))) => u,
            Ok(Ok(None)) => return Ok(Ended::Closed),
            Ok(Err(s)) if mesh_api::shutdown::is(&s) => return Ok(Ended::Stopping),
            Ok(Err(s)) => return Err(describe(&s)),
            Err(None) => {
                // The proxy is gone (shutting down): nothing more will be asked, and the
                // stream stays on demand.
                *lookups = None;
                continue;
            }
            Err(Some(first)) => {
                let Some(queue) = lookups.as_mut() else {
                    continue;
                };
                let wanted = demand::batch(first, queue);
                if let Some(message) = held.asked.ask(wanted, &mut held.view) {
                    tracing::debug!(
                        keys = message.watch.len(),
                        addresses = message.watch_addresses.len(),
                        released = message.unwatch_addresses.len(),
                        "asking the control plane for workloads on demand"
                    );
                    if ack_tx.send(message).await.is_err() {
                        return Err("the stream's send side closed".into());
                    }
                }
                continue;
            }
        };
        let update = match parts.push(part) {
            Ok(Some(whole)) => whole,
            Ok(None) => continue,
            Err(e) => return Err(format!("broken config stream: {e}")),
        };
        let (version, snapshot, epoch) = (update.version, update.snapshot, update.epoch);
        // Changes apply only to what they were computed against: this stream's snapshot, or
        // the view this node said it held.
        if !snapshot && (first && resuming != Some(epoch) || held.epoch != Some(epoch)) {
            held.epoch = None;
            return Err(format!(
                "the control plane sent changes (version {version}, epoch {epoch}) to a view it did not send; starting again from a snapshot"
            ));
        }
        held.asked.answered_by(&update);
        let error = match held.view.apply(update) {
            Ok(next) => {
                held.view = next;
                held.epoch = Some(epoch);
                if first {
                    connected.send_replace(true);
                    backoff.reset();
                }
                let counts = (held.view.workloads.len(), held.view.services.len());
                if snapshot {
                    tracing::info!(
                        version,
                        workloads = counts.0,
                        services = counts.1,
                        "config snapshot received"
                    );
                } else if first {
                    tracing::info!(
                        version,
                        workloads = counts.0,
                        services = counts.1,
                        "config stream resumed from the version held"
                    );
                } else {
                    tracing::info!(version, "config update received");
                }
                first = false;
                enroll(apply, Arc::new(held.view.clone())).await
            }
            Err(e) => {
                tracing::error!(version, "config update rejected: {e}");
                // What is held no longer matches what the control plane thinks it sent.
                held.epoch = None;
                if snapshot || first {
                    // Without a usable first message there is no base for what follows.
                    let what = if snapshot {
                        "snapshot"
                    } else {
                        "resumed stream's first update"
                    };
                    return Err(format!("unusable {what}: {e}"));
                }
                e
            }
        };
        let ack = ConfigAck {
            version,
            error,
            ..Default::default()
        };
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
    // Connection failures carry the useful part in the source chain, not the message; the
    // chain repeats itself ("tcp connect error" three times), each cause is said once.
    let mut causes = vec![format!("{:?}: {}", status.code(), status.message())];
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    let mut text = mesh_daemon::exit::join_causes(causes);
    if text.contains("certificate not valid for name") {
        text.push_str(
            " (give --cp a name the control plane's certificate has, or add this one: mesh-cp serve --server-name NAME)",
        );
    }
    text
}
