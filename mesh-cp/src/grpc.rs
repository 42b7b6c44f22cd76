//! The gRPC service nodes talk to: the config stream and certificate signing, both scoped to
//! the node the caller's credential speaks for (`node_auth.rs`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_api::{
    metadata,
    v1::{
        node_service_server::NodeService, ConfigAck, ConfigUpdate, SignCertificateRequest,
        SignCertificateResponse,
    },
};
use mesh_model::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    metrics::Refusal,
    node_auth::AuthError,
    slice::{self, Slice},
    state::Shared,
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
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(serve_stream(
            self.shared.clone(),
            node,
            token,
            peer,
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

/// Feeds one node's config stream until the node goes away or its token stops being valid.
async fn serve_stream(
    shared: Arc<Shared>,
    node: String,
    token: String,
    peer: Option<SocketAddr>,
    mut acks: Streaming<ConfigAck>,
    tx: mpsc::Sender<Result<ConfigUpdate, Status>>,
    // Held for the stream's life: the peer's place among its streams.
    _slot: Option<crate::peer_limits::StreamSlot>,
) {
    shared.update_node(&node, |n| n.streams += 1);
    tracing::info!(node, peer = ?peer, "node connected");
    let mut config = shared.config.clone();
    let roots = [shared.ca.root_der().clone()];
    let mut sent: Option<Slice> = None;
    let mut dirty = true;
    let mut recheck = tokio::time::interval(TOKEN_RECHECK);
    // Versions sent and not yet answered, oldest first, with when they were sent.
    let mut in_flight: Vec<(u64, Instant)> = Vec::new();
    let reason = loop {
        if dirty {
            dirty = false;
            let published = config.borrow_and_update().clone();
            let slice = slice::node_slice(&published.config, &published.policies, &roots, &node);
            let update = match &sent {
                None => Some(ConfigUpdate {
                    version: published.version,
                    snapshot: true,
                    upserts: slice.values().cloned().collect(),
                    removals: Vec::new(),
                    more: false,
                }),
                Some(old) => {
                    let (upserts, removals) = slice::diff(old, &slice);
                    (!upserts.is_empty() || !removals.is_empty()).then_some(ConfigUpdate {
                        version: published.version,
                        snapshot: false,
                        upserts,
                        removals,
                        more: false,
                    })
                }
            };
            if let Some(update) = update {
                tracing::debug!(
                    node,
                    version = update.version,
                    snapshot = update.snapshot,
                    upserts = update.upserts.len(),
                    removals = update.removals.len(),
                    "sending config"
                );
                let (version, snapshot) = (update.version, update.snapshot);
                // In parts of bounded size: a first sync grows with the mesh, and gRPC
                // refuses a message over 4 MiB.
                let mut closed = false;
                for part in mesh_api::parts::split(update) {
                    if tx.send(Ok(part)).await.is_err() {
                        closed = true;
                        break;
                    }
                }
                if closed {
                    break "stream closed";
                }
                shared.metrics.pushed(snapshot);
                in_flight.push((version, Instant::now()));
            }
            sent = Some(slice);
        }
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() {
                    break "control plane shutting down";
                }
                dirty = true;
            }
            ack = acks.message() => match ack {
                Ok(Some(ack)) if ack.error.is_empty() => {
                    tracing::debug!(node, version = ack.version, "config acknowledged");
                    let took = answered(&mut in_flight, ack.version);
                    shared.metrics.acked(true, took);
                    shared.update_node(&node, |n| n.acked_version = Some(ack.version));
                }
                Ok(Some(ack)) => {
                    tracing::warn!(node, version = ack.version, error = ack.error, "node rejected config");
                    answered(&mut in_flight, ack.version);
                    shared.metrics.acked(false, None);
                    shared.update_node(&node, |n| n.last_nack = Some((ack.version, ack.error)));
                }
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
