//! The gRPC service nodes talk to: the config stream and certificate signing, both scoped to
//! the node the caller's credential speaks for (`node_auth.rs`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_api::{
    keys, metadata,
    parts::Parts,
    v1::{
        self, node_service_server::NodeService, ConfigAck, ConfigUpdate, SignCertificateRequest,
        SignCertificateResponse,
    },
};
use mesh_model::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    distribute::Delta,
    metrics::{Push, Refusal},
    node_auth::AuthError,
    state::{Published, Shared},
};

/// How often an open config stream re-checks that its credential is still valid (a join
/// token not revoked, a service-account token not expired).
const TOKEN_RECHECK: Duration = Duration::from_secs(2);

pub struct NodeApi {
    shared: Arc<Shared>,
}

impl NodeApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Returns the node name and token of an authenticated caller.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<(String, String), Status> {
        let peer = req.remote_addr();
        let refused = |e: AuthError| {
            self.shared.metrics.node_refused(e.label());
            // A throttled address is not worth a line per attempt.
            if matches!(e, AuthError::Throttled(_)) {
                tracing::debug!(peer = ?peer, reason = %e, "node refused");
            }
            match e {
                AuthError::Unauthenticated(m) => Status::unauthenticated(m),
                AuthError::PermissionDenied(m) => Status::permission_denied(m),
                AuthError::Unavailable(m) => Status::unavailable(m),
                AuthError::Throttled(m) => Status::resource_exhausted(m),
            }
        };
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let token = header(metadata::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        let claimed = header(metadata::NODE)
            .ok_or_else(|| Status::unauthenticated("missing `x-mycel-node` metadata"))?;
        let ip = peer.map(|p| p.ip().to_canonical());
        match self.shared.auth.verify(&token, &claimed, ip).await {
            Ok(node) => Ok((node, token)),
            Err(e) => {
                if !matches!(e, AuthError::Throttled(_)) {
                    tracing::warn!(peer = ?peer, claimed, reason = %e, "node refused");
                }
                Err(refused(e))
            }
        }
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    type StreamConfigStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn stream_config(
        &self,
        req: Request<Streaming<ConfigAck>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let (node, token) = self.authenticate(&req).await?;
        let peer = req.remote_addr();
        let slot = match peer {
            Some(p) => match self.shared.auth.peers.stream(&node, p.ip().to_canonical()) {
                Some(slot) => Some(slot),
                None => {
                    self.shared.metrics.node_refused("too_many_streams");
                    let why = format!(
                        "node {node} has {} config streams open already (or its address {})",
                        crate::peer_limits::STREAMS_PER_NODE,
                        crate::peer_limits::STREAMS_PER_ADDRESS
                    );
                    tracing::warn!(node, peer = %p, "node refused: {why}");
                    return Err(Status::resource_exhausted(why));
                }
            },
            None => None,
        };
        // Two parts queued at most: the rest waits in the catalog, not in memory.
        let (tx, rx) = mpsc::channel(2);
        let resume = resume_from(
            req.metadata()
                .get(metadata::RESUME)
                .and_then(|v| v.to_str().ok()),
            self.shared.epoch,
        );
        tokio::spawn(serve_stream(
            self.shared.clone(),
            node,
            token,
            peer,
            resume,
            req.into_inner(),
            tx,
            slot,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn sign_certificate(
        &self,
        req: Request<SignCertificateRequest>,
    ) -> Result<Response<SignCertificateResponse>, Status> {
        let (node, _) = self.authenticate(&req).await?;
        let req = req.into_inner();
        let refuse = |why: Refusal, status: Status| {
            self.shared.metrics.refused(why);
            tracing::warn!(
                node,
                identity = req.identity,
                reason = status.message(),
                "certificate refused"
            );
            self.shared
                .update_node(&node, |n| n.certificates_refused += 1);
            status
        };
        let identity: SpiffeId =
            req.identity
                .parse()
                .map_err(|e: mesh_model::ParseSpiffeIdError| {
                    refuse(
                        Refusal::BadIdentity,
                        Status::invalid_argument(e.to_string()),
                    )
                })?;
        let published = self.shared.config.borrow().clone();
        let mesh = &published.config.mesh;
        if identity.trust_domain != mesh.trust_domain {
            return Err(refuse(
                Refusal::TrustDomain,
                Status::permission_denied(format!(
                    "{identity} is not in this mesh's trust domain {}",
                    mesh.trust_domain
                )),
            ));
        }
        let placed = published
            .config
            .workloads_on(&node)
            .any(|w| w.identity(&mesh.trust_domain) == identity);
        if !placed {
            return Err(refuse(
                Refusal::NotPlaced,
                Status::permission_denied(format!(
                    "no workload with identity {identity} is placed on node {node}"
                )),
            ));
        }
        let issued = self
            .shared
            .ca
            .sign_workload(&req.csr_der, &identity, mesh.cert_ttl)
            .map_err(|e| refuse(Refusal::BadCsr, Status::invalid_argument(e.to_string())))?;
        self.shared
            .update_node(&node, |n| n.certificates_issued += 1);
        self.shared.metrics.issued();
        tracing::info!(node, %identity, serial = issued.serial, not_after = %issued.not_after, "certificate issued");
        Ok(Response::new(SignCertificateResponse {
            cert_chain_der: vec![issued.der.to_vec()],
        }))
    }
}

/// `x-mycel-resume` ("<epoch>-<version>") as the version to resume from, if it names this
/// control plane's epoch. Anything else is a node that takes a snapshot: never an error.
fn resume_from(value: Option<&str>, epoch: u64) -> Option<u64> {
    let (e, v) = value?.split_once('-')?;
    (e.parse::<u64>().ok()? == epoch).then_some(())?;
    v.parse().ok()
}

/// Sends `parts` in order; false when the node has gone.
async fn send_all(
    tx: &mpsc::Sender<Result<ConfigUpdate, Status>>,
    parts: impl IntoIterator<Item = ConfigUpdate>,
) -> bool {
    for part in parts {
        if tx.send(Ok(part)).await.is_err() {
            return false;
        }
    }
    true
}

/// How long a node that was sent a snapshot keeps its place among the snapshots in progress
/// without acknowledging it.
const SNAPSHOT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Sends `node` everything it holds at `published`, part by part. Snapshots are the one
/// thing whose cost grows with the mesh, so only so many are in progress at once
/// ([`Shared::first_syncs`]): a crowd of nodes reconnecting together queues here instead of
/// holding the control plane's CPU and memory all at once. Returns the resources sent and
/// the place, which the stream keeps until the node acknowledges (the bytes are on their way
/// until then), or `None` when the node has gone.
async fn send_snapshot<'a>(
    shared: &'a Shared,
    node: &str,
    published: &Published,
    tx: &mpsc::Sender<Result<ConfigUpdate, Status>>,
) -> Option<(usize, tokio::sync::SemaphorePermit<'a>)> {
    let permit = shared.first_syncs.acquire().await.ok()?;
    let mut parts = Parts::new(shared.epoch, published.version, true);
    let mut count = 1;
    let roots = v1::Resource {
        key: keys::TRUST_BUNDLE.into(),
        kind: Some(v1::resource::Kind::TrustBundle(v1::TrustBundle {
            roots_der: vec![shared.ca.root_der().to_vec()],
        })),
    };
    // Each part goes as soon as it is full: what this stream holds is one part.
    let mut add = async |resource| match parts.upsert(resource) {
        Some(full) => tx.send(Ok(full)).await.is_ok(),
        None => true,
    };
    // In key order, with the trust bundle (the same for every version) in its place.
    let mut roots = Some(roots);
    for entry in published.distribution.catalog.snapshot(node) {
        if let Some(r) = roots.take_if(|r| r.key < entry.key) {
            if !add(r).await {
                return None;
            }
        }
        count += 1;
        if !add(v1::Resource::clone(entry)).await {
            return None;
        }
    }
    if let Some(r) = roots {
        if !add(r).await {
            return None;
        }
    }
    send_all(tx, [parts.finish()])
        .await
        .then_some((count, permit))
}

/// Feeds one node's config stream until the node goes away or its token stops being valid.
#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    shared: Arc<Shared>,
    node: String,
    token: String,
    peer: Option<SocketAddr>,
    // The version the node says it holds, in this control plane's epoch.
    resume: Option<u64>,
    mut acks: Streaming<ConfigAck>,
    tx: mpsc::Sender<Result<ConfigUpdate, Status>>,
    // Held for the stream's life: the peer's place among its streams.
    _slot: Option<crate::peer_limits::StreamSlot>,
) {
    shared.update_node(&node, |n| n.streams += 1);
    tracing::info!(node, peer = ?peer, resume, "node connected");
    let mut config = shared.config.clone();
    // The version the node holds as far as this stream knows; none until a snapshot is sent.
    let mut cursor = resume;
    let mut first = true;
    let mut dirty = true;
    let mut recheck = tokio::time::interval(TOKEN_RECHECK);
    // Versions sent and not yet answered, oldest first, with when they were sent.
    let mut in_flight: Vec<(u64, Instant)> = Vec::new();
    // The snapshot in progress: its version, when it was sent, and its place.
    let mut syncing: Option<(u64, Instant, tokio::sync::SemaphorePermit<'_>)> = None;
    let reason = loop {
        if syncing
            .as_ref()
            .is_some_and(|(_, at, _)| at.elapsed() > SNAPSHOT_ACK_WAIT)
        {
            tracing::debug!(
                node,
                "snapshot not acknowledged in time; its place goes to another"
            );
            syncing = None;
        }
        if dirty {
            dirty = false;
            let published = config.borrow_and_update().clone();
            let version = published.version;
            let delta = match cursor {
                None => Delta::Snapshot,
                Some(since) => published.distribution.delta(&node, since, version),
            };
            let sent = match delta {
                // A resuming node is told it is current, so that it knows it is synced.
                Delta::None if !first => None,
                Delta::None => Some((
                    Push::Resume,
                    0,
                    send_all(&tx, [Parts::new(shared.epoch, version, false).finish()]).await,
                )),
                Delta::Changes { upserts, removals } => {
                    let kind = if first { Push::Resume } else { Push::Update };
                    let count = upserts.len() + removals.len();
                    let update = ConfigUpdate {
                        version,
                        snapshot: false,
                        upserts,
                        removals,
                        more: false,
                        epoch: shared.epoch,
                    };
                    Some((
                        kind,
                        count,
                        send_all(&tx, mesh_api::parts::split(update)).await,
                    ))
                }
                Delta::Snapshot => match send_snapshot(&shared, &node, &published, &tx).await {
                    Some((count, permit)) => {
                        syncing = Some((version, Instant::now(), permit));
                        Some((Push::Snapshot, count, true))
                    }
                    None => Some((Push::Snapshot, 0, false)),
                },
            };
            first = false;
            cursor = Some(version);
            if let Some((kind, count, delivered)) = sent {
                if !delivered {
                    break "stream closed";
                }
                tracing::debug!(
                    node,
                    version,
                    kind = kind.as_str(),
                    resources = count,
                    "config sent"
                );
                shared.metrics.pushed(kind, count);
                in_flight.push((version, Instant::now()));
            }
        }
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() {
                    break "control plane shutting down";
                }
                dirty = true;
            }
            ack = acks.message() => match ack {
                Ok(Some(ack)) if syncing.as_ref().is_some_and(|(v, _, _)| ack.version >= *v) => {
                    // Answered (applied or not): the snapshot's place goes to another node.
                    syncing = None;
                    answer(&shared, &node, &mut in_flight, ack);
                }
                Ok(Some(ack)) => answer(&shared, &node, &mut in_flight, ack),
                Ok(None) => break "node closed the stream",
                Err(_) => break "stream broken",
            },
            _ = recheck.tick() => {
                // Unavailable is not a verdict: the stream stays until the credential is refused.
                let ip = peer.map(|p| p.ip().to_canonical());
                if let Err(e @ (AuthError::Unauthenticated(_) | AuthError::PermissionDenied(_))) =
                    shared.auth.verify(&token, &node, ip).await
                {
                    tracing::warn!(node, reason = %e, "node credential no longer valid; closing the node's stream");
                    let _ = tx.send(Err(Status::unauthenticated(format!("credential no longer valid: {e}")))).await;
                    break "credential no longer valid";
                }
            }
        }
    };
    shared.update_node(&node, |n| n.streams = n.streams.saturating_sub(1));
    tracing::info!(node, reason, "node disconnected");
}

/// Records a node's answer to a version.
fn answer(shared: &Shared, node: &str, in_flight: &mut Vec<(u64, Instant)>, ack: ConfigAck) {
    if ack.error.is_empty() {
        tracing::debug!(node, version = ack.version, "config acknowledged");
        let took = answered(in_flight, ack.version);
        shared.metrics.acked(true, took);
        shared.update_node(node, |n| n.acked_version = Some(ack.version));
    } else {
        tracing::warn!(
            node,
            version = ack.version,
            error = ack.error,
            "node rejected config"
        );
        answered(in_flight, ack.version);
        shared.metrics.acked(false, None);
        shared.update_node(node, |n| n.last_nack = Some((ack.version, ack.error)));
    }
}

/// Removes the versions up to `version` from `in_flight`; the seconds since `version` itself
/// was sent, if it was.
fn answered(in_flight: &mut Vec<(u64, Instant)>, version: u64) -> Option<f64> {
    let took = in_flight
        .iter()
        .find(|(v, _)| *v == version)
        .map(|(_, at)| at.elapsed().as_secs_f64());
    in_flight.retain(|(v, _)| *v > version);
    took
}
