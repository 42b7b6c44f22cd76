//! The gRPC service nodes talk to: the config stream and certificate signing, both scoped to
//! the node the caller's credential speaks for (`node_auth.rs`).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_api::{
    encoded::{EncodedResource, EncodedUpdate},
    keys, metadata,
    parts::Parts,
    server::node_service_server::NodeService,
    v1::{self, ConfigAck, SignCertificateRequest, SignCertificateResponse},
};
use mesh_model::SpiffeId;
use tokio::sync::{mpsc, watch, SemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    distribute::{Answers, Catalog, Delta, WatchError, Watches},
    metrics::{Push, Refusal},
    node_auth::AuthError,
    state::{NodeStatus, Published, Shared},
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
    type StreamConfigStream = ReceiverStream<Result<EncodedUpdate, Status>>;

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
        let on_demand = metadata::on_demand(&req).map_err(Status::invalid_argument)?;
        // Scraped by the dashboard at the stream's own address: a node names a port, never
        // where mesh-cp connects.
        let metrics = metadata::metrics_port(&req)
            .zip(peer)
            .map(|(port, p)| std::net::SocketAddr::new(p.ip().to_canonical(), port));
        self.shared.update_node(&node, |n| n.metrics = metrics);
        // Only a version of this run can be resumed from; anything else takes a snapshot.
        let resume = metadata::resume(&req)
            .filter(|(epoch, _)| *epoch == self.shared.epoch)
            .map(|(_, version)| version);
        // With etcd, a node ahead of this replica has seen what this replica has not read yet
        // (it lost etcd, or lags): a snapshot from here would take the node back. It goes to
        // another replica instead.
        let latest = self.shared.config.borrow().version;
        if let Some(held) = resume.filter(|v| *v > latest && self.shared.config_source == "etcd") {
            drop(slot);
            tracing::warn!(node, held, latest, "node refused: it holds a later config version than this replica has read from etcd");
            return Err(Status::unavailable(format!(
                "this control plane is behind the config version the node holds ({held} > {latest}); try another replica"
            )));
        }
        tokio::spawn(serve_stream(
            self.shared.clone(),
            node,
            token,
            peer,
            resume,
            on_demand,
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
        // The identities placed on the node: the one asked for must be among them, and the
        // node's certificate record keeps only these.
        let placed: std::collections::BTreeSet<SpiffeId> = published
            .config
            .workloads_on(&node)
            .map(|w| w.identity(&mesh.trust_domain))
            .collect();
        if !placed.contains(&identity) {
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
        self.shared.update_node(&node, |n| {
            n.certificates_issued += 1;
            n.certificates.retain(|id, _| placed.contains(id));
            n.certificates
                .insert(identity.clone(), issued.not_after.into());
        });
        self.shared.metrics.issued();
        tracing::info!(node, %identity, serial = issued.serial, not_after = %issued.expires(), "certificate issued");
        Ok(Response::new(SignCertificateResponse {
            cert_chain_der: vec![issued.der.to_vec()],
        }))
    }
}

/// How long one part may wait for the node to take it: a node that stops reading (its
/// HTTP/2 window closed) loses its stream, and with it any place among the snapshots.
const SEND_WAIT: Duration = Duration::from_secs(30);

/// How long a snapshot may take to send whole: a node that takes each part just within
/// [`SEND_WAIT`] would otherwise keep its place among the snapshots in progress for hours
/// (a 14 MB snapshot is 440 parts). Far above what the largest snapshot takes (1–2 s at
/// 5,000 nodes and 100,000 workloads, 32 at once).
const SNAPSHOT_SEND_WAIT: Duration = Duration::from_secs(120);

/// How long a node that was sent a snapshot keeps its place among the snapshots in progress
/// without acknowledging it.
const SNAPSHOT_ACK_WAIT: Duration = Duration::from_secs(30);

type Tx = mpsc::Sender<Result<EncodedUpdate, Status>>;

/// Why a stream stopped sending.
enum Stop {
    Gone,
    NotReading,
    Refused(AuthError),
}

/// Sends one part; the node must take it within [`SEND_WAIT`].
async fn send(tx: &Tx, part: EncodedUpdate) -> Result<(), Stop> {
    send_by(tx, part, tokio::time::Instant::now() + SEND_WAIT).await
}

/// Sends one part; the node must take it within [`SEND_WAIT`] and by `deadline`.
async fn send_by(tx: &Tx, part: EncodedUpdate, deadline: tokio::time::Instant) -> Result<(), Stop> {
    let by = deadline.min(tokio::time::Instant::now() + SEND_WAIT);
    match tokio::time::timeout_at(by, tx.send(Ok(part))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Stop::Gone),
        Err(_) => Err(Stop::NotReading),
    }
}

/// Who is at the other end of a stream, to check again that it still may be.
struct Caller<'a> {
    node: &'a str,
    token: &'a str,
    ip: Option<std::net::IpAddr>,
}

impl Caller<'_> {
    /// Unavailable is not a verdict: only a refused credential ends a stream.
    async fn check(&self, shared: &Shared) -> Result<(), AuthError> {
        match shared.auth.verify(self.token, self.node, self.ip).await {
            Err(e @ (AuthError::Unauthenticated(_) | AuthError::PermissionDenied(_))) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Sends `node` what changed for it (`keys`) in `published`, and the answers to what it asked
/// for on demand, part by part: each resource is looked up as its part is built, so a stream
/// holds one part at a time. Returns the resources and removals sent.
async fn send_changes(
    shared: &Shared,
    node: &str,
    published: &Published,
    keys: Vec<&str>,
    demand: Option<(&Watches, Answers)>,
    tx: &Tx,
) -> Result<usize, Stop> {
    let catalog = &published.distribution.catalog;
    let mut parts = Parts::new(shared.epoch, published.version, false);
    let (watches, answers) = match demand {
        Some((w, a)) => (Some(w), a),
        None => (None, Answers::default()),
    };
    // A key that changed and was asked for goes once.
    let keys: BTreeSet<&str> = keys
        .into_iter()
        .chain(answers.keys.iter().map(String::as_str))
        .collect();
    let count = keys.len() + answers.absent.len();
    for key in keys {
        let entry = match watches {
            Some(w) => w.entry(catalog, node, key),
            None => catalog.get(node, key),
        };
        let full = match entry {
            Some(entry) => parts.upsert(entry.wire().clone()),
            None => parts.remove(key.to_owned()),
        };
        if let Some(part) = full {
            send(tx, part).await?;
        }
    }
    for ip in answers.absent {
        if let Some(part) = parts.absent(mesh_api::ip_to_bytes(ip)) {
            send(tx, part).await?;
        }
    }
    send(tx, parts.finish()).await?;
    Ok(count)
}

/// Sends `caller` everything it holds at the latest version, part by part. Snapshots are the
/// one thing whose cost grows with the mesh, so only so many are in progress at once
/// ([`Shared::first_syncs`]): a crowd of nodes reconnecting together queues here instead of
/// holding the control plane's CPU and memory all at once. The place is taken before the
/// config is read (a stream that waited sends the version in force when its turn comes),
/// the credential is checked again once it is, and the place is returned to the stream,
/// which keeps it until the node acknowledges (the bytes are on their way until then).
/// Returns the version sent, the resources and the place.
async fn send_snapshot<'a>(
    shared: &'a Shared,
    caller: &Caller<'_>,
    config: &mut watch::Receiver<Published>,
    watches: Option<&mut Watches>,
    tx: &Tx,
) -> Result<(u64, usize, SemaphorePermit<'a>), Stop> {
    let permit = tokio::select! {
        permit = shared.first_syncs.acquire() => permit.map_err(|_| Stop::Gone)?,
        () = tx.closed() => return Err(Stop::Gone),
    };
    caller.check(shared).await.map_err(Stop::Refused)?;
    let deadline = tokio::time::Instant::now() + SNAPSHOT_SEND_WAIT;
    let published = config.borrow_and_update().clone();
    let mut parts = Parts::new(shared.epoch, published.version, true);
    let mut count = 1;
    let roots = EncodedResource::new(v1::Resource {
        key: keys::TRUST_BUNDLE.into(),
        kind: Some(v1::resource::Kind::TrustBundle(v1::TrustBundle {
            roots_der: vec![shared.ca.root_der().to_vec()],
        })),
    });
    if let Some(watches) = watches {
        let catalog = &published.distribution.catalog;
        let answers = watches.answer_all(catalog);
        count_answers(shared, catalog, caller.node, &answers);
        if let Some(part) = parts.upsert(roots.wire().clone()) {
            send_by(tx, part, deadline).await?;
        }
        for entry in watches.snapshot(catalog, caller.node) {
            count += 1;
            if let Some(part) = parts.upsert(entry.wire().clone()) {
                send_by(tx, part, deadline).await?;
            }
        }
        // A watched key no workload has is answered too: the node asked for it.
        for key in watches.missing(catalog, caller.node) {
            count += 1;
            if let Some(part) = parts.remove(key.to_owned()) {
                send_by(tx, part, deadline).await?;
            }
        }
        for ip in answers.absent {
            if let Some(part) = parts.absent(mesh_api::ip_to_bytes(ip)) {
                send_by(tx, part, deadline).await?;
            }
        }
        send_by(tx, parts.finish(), deadline).await?;
        return Ok((published.version, count, permit));
    }
    // In key order, with the trust bundle (the same for every version) in its place. Each
    // part goes as soon as it is full: what this stream holds is one part.
    let mut roots = Some(roots);
    for entry in published.distribution.catalog.snapshot(caller.node) {
        if let Some(r) = roots.take_if(|r| r.key() < entry.key()) {
            if let Some(part) = parts.upsert(r.wire().clone()) {
                send_by(tx, part, deadline).await?;
            }
        }
        count += 1;
        if let Some(part) = parts.upsert(entry.wire().clone()) {
            send_by(tx, part, deadline).await?;
        }
    }
    if let Some(part) = roots.and_then(|r| parts.upsert(r.wire().clone())) {
        send_by(tx, part, deadline).await?;
    }
    send_by(tx, parts.finish(), deadline).await?;
    Ok((published.version, count, permit))
}

/// How long an on-demand node has to name what it watches before it is sent a snapshot (of
/// nothing but its own, if it named nothing).
const WATCHES_WAIT: Duration = Duration::from_secs(10);

/// Feeds one node's config stream until the node goes away or its token stops being valid.
#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    shared: Arc<Shared>,
    node: String,
    token: String,
    peer: Option<SocketAddr>,
    // The version the node says it holds, in this control plane's epoch.
    resume: Option<u64>,
    // Whether the node takes other nodes' workloads on demand.
    on_demand: bool,
    mut acks: Streaming<ConfigAck>,
    tx: Tx,
    // Held for the stream's life: the peer's place among its streams.
    _slot: Option<crate::peer_limits::StreamSlot>,
) {
    shared.update_node(&node, |n| {
        n.opened();
        // A stream that starts afresh is sent a snapshot: until the node answers it, it holds
        // nothing this stream knows of.
        if resume.is_none() {
            n.synced_version = None;
        }
    });
    tracing::info!(node, peer = ?peer, resume, on_demand, "node connected");
    let caller = Caller {
        node: &node,
        token: &token,
        ip: peer.map(|p| p.ip().to_canonical()),
    };
    let mut config = shared.config.clone();
    // The version the node holds as far as this stream knows; none until a snapshot is sent.
    let mut cursor = resume;
    let mut watches = on_demand.then(Watches::default);
    // An answer to a version that came with a resuming node's watches.
    let mut first_ack = None;
    // An on-demand node names what it watches first. One that resumes holds those already:
    // what changed since its version is filtered by them. One that starts afresh is
    // answered in its snapshot, so that it never holds a view without the workloads it had
    // (a restarted control plane would otherwise drop them from every node at once).
    if let Some(w) = watches.as_mut() {
        match tokio::time::timeout(WATCHES_WAIT, acks.message()).await {
            Ok(Ok(Some(first))) => {
                let taken = match cursor {
                    Some(_) => w.resume(&first),
                    None => w.request(&first),
                };
                if let Err(e) = taken {
                    refuse_watches(&shared, &node, &tx, &e).await;
                    shared.update_node(&node, NodeStatus::closed);
                    return;
                }
                first_ack = Some(first).filter(|m| m.version > 0);
            }
            Ok(_) => {
                shared.update_node(&node, NodeStatus::closed);
                tracing::info!(node, "node disconnected before naming its watches");
                return;
            }
            Err(_) => {
                tracing::warn!(node, "on-demand node named no watches within 10 s; sending a snapshot of what it watches: nothing");
                cursor = None;
            }
        }
    }
    let mut watched = 0;
    let mut first = true;
    let mut dirty = true;
    let mut recheck = tokio::time::interval(TOKEN_RECHECK);
    // Versions sent and not yet answered, oldest first, with when they were sent.
    let mut in_flight: Vec<(u64, Instant)> = Vec::new();
    // Whether the node rejected a version on this stream: what follows is computed against a
    // view it does not hold, so it holds no later version all of (it starts again with a
    // snapshot on its next stream).
    let mut rejected = false;
    if let Some(ack) = first_ack {
        answer(&shared, &node, &mut in_flight, &mut rejected, cursor, ack);
    }
    // The snapshot in progress: its version, and its place until the node answers or
    // SNAPSHOT_ACK_WAIT passes.
    let mut syncing: Option<(u64, SemaphorePermit<'_>)> = None;
    let mut syncing_until = tokio::time::Instant::now();
    let mut stopping = shared.stopping.subscribe();
    let reason = loop {
        if dirty {
            dirty = false;
            let published = config.borrow_and_update().clone();
            let delta = match (cursor, watches.as_mut()) {
                (None, _) => Delta::Snapshot,
                (Some(since), None) => {
                    published
                        .distribution
                        .delta(&node, since, published.version)
                }
                (Some(since), Some(w)) => {
                    published
                        .distribution
                        .delta_watched(&node, since, published.version, w)
                }
            };
            // What the node asked for goes with the changes, at the same version.
            let demand = match (&delta, watches.as_mut()) {
                (Delta::Snapshot, _) | (_, None) => None,
                (_, Some(w)) => {
                    let answers = w.answer(&published.distribution.catalog);
                    count_answers(&shared, &published.distribution.catalog, &node, &answers);
                    let any = !answers.keys.is_empty() || !answers.absent.is_empty();
                    Some((&*w, answers)).filter(|_| any)
                }
            };
            let kind = if first { Push::Resume } else { Push::Update };
            let sent = match (delta, demand) {
                (Delta::None, None) if !first => Ok(None),
                // A resuming node is told it is current, so that it knows it is synced.
                (Delta::None, demand) => {
                    send_changes(&shared, &node, &published, Vec::new(), demand, &tx)
                        .await
                        .map(|count| Some((kind, published.version, count)))
                }
                (Delta::Changes(keys), demand) => {
                    send_changes(&shared, &node, &published, keys, demand, &tx)
                        .await
                        .map(|count| Some((kind, published.version, count)))
                }
                (Delta::Snapshot, _) => {
                    // Its own place first: a stream must not wait for a place while it
                    // holds one.
                    syncing = None;
                    send_snapshot(&shared, &caller, &mut config, watches.as_mut(), &tx)
                        .await
                        .map(|(version, count, permit)| {
                            syncing = Some((version, permit));
                            syncing_until = tokio::time::Instant::now() + SNAPSHOT_ACK_WAIT;
                            Some((Push::Snapshot, version, count))
                        })
                }
            };
            match sent {
                Ok(Some((kind, version, count))) => {
                    tracing::debug!(
                        node,
                        version,
                        kind = kind.as_str(),
                        resources = count,
                        "config sent"
                    );
                    shared.metrics.pushed(kind, count);
                    in_flight.push((version, Instant::now()));
                    cursor = Some(version);
                    waiting(&shared, &node, &in_flight);
                }
                Ok(None) => {
                    cursor = Some(published.version);
                    if in_flight.is_empty() && !rejected {
                        // Nothing of this version is the node's: it holds all of it already.
                        shared.update_node(&node, |n| {
                            n.synced_version = n.synced_version.max(cursor)
                        });
                    }
                }
                Err(Stop::Gone) => break "stream closed",
                Err(Stop::NotReading) => {
                    tracing::warn!(
                        node,
                        "node stopped reading its config stream (a part not taken within 30 s, or a snapshot not within 120 s); closing it"
                    );
                    break "node stopped reading";
                }
                Err(Stop::Refused(e)) => {
                    tracing::warn!(node, reason = %e, "node credential no longer valid; closing the node's stream");
                    let _ = tx.try_send(Err(Status::unauthenticated(format!(
                        "credential no longer valid: {e}"
                    ))));
                    break "credential no longer valid";
                }
            }
            first = false;
            if let Some(w) = &watches {
                let now = w.len();
                if now != watched {
                    shared.update_node(&node, |n| {
                        n.watches = n.watches.saturating_sub(watched) + now
                    });
                    watched = now;
                }
            }
        }
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() {
                    break "control plane shutting down";
                }
                dirty = true;
            }
            () = async { let _ = stopping.wait_for(|s| *s).await; } => {
                // Told in order, so that the node logs a restart, not a failure.
                let _ = tokio::time::timeout(SEND_WAIT, tx.send(Err(mesh_api::shutdown::status()))).await;
                break "control plane shutting down";
            }
            ack = acks.message() => match ack {
                Ok(Some(ack)) => {
                    let demand = !ack.watch.is_empty()
                        || !ack.watch_addresses.is_empty()
                        || !ack.unwatch.is_empty()
                        || !ack.unwatch_addresses.is_empty();
                    if demand {
                        let taken = match watches.as_mut() {
                            Some(w) => w.request(&ack),
                            None => Err(WatchError::NotOnDemand),
                        };
                        if let Err(e) = taken {
                            refuse_watches(&shared, &node, &tx, &e).await;
                            break "watches refused";
                        }
                        dirty = true;
                    }
                    if ack.version == 0 {
                        continue;
                    }
                    if syncing.as_ref().is_some_and(|(v, _)| ack.version >= *v) {
                        // Answered (applied or not): the place goes to another node.
                        syncing = None;
                    }
                    answer(&shared, &node, &mut in_flight, &mut rejected, cursor, ack);
                }
                Ok(None) => break "node closed the stream",
                Err(_) => break "stream broken",
            },
            () = tokio::time::sleep_until(syncing_until), if syncing.is_some() => {
                tracing::warn!(node, "snapshot not acknowledged within 30 s; its place goes to another node");
                syncing = None;
            }
            _ = recheck.tick() => {
                if let Err(e) = caller.check(&shared).await {
                    tracing::warn!(node, reason = %e, "node credential no longer valid; closing the node's stream");
                    let _ = tx.send(Err(Status::unauthenticated(format!("credential no longer valid: {e}")))).await;
                    break "credential no longer valid";
                }
            }
        }
    };
    shared.update_node(&node, |n| {
        n.closed();
        n.watches = n.watches.saturating_sub(watched);
    });
    tracing::info!(node, reason, "node disconnected");
}

/// Counts what a stream answers on demand: workloads sent, and keys or addresses that no
/// workload has.
fn count_answers(shared: &Shared, catalog: &Catalog, node: &str, answers: &Answers) {
    let found = answers
        .keys
        .iter()
        .filter(|k| catalog.get(node, k).is_some())
        .count();
    let absent = answers.keys.len() - found + answers.absent.len();
    shared.metrics.on_demand(found, absent);
}

/// Ends a stream whose node asked for what it may not: the node is told why (the status waits
/// behind the parts queued, as long as one part may).
async fn refuse_watches(shared: &Shared, node: &str, tx: &Tx, e: &WatchError) {
    shared.metrics.on_demand_refused();
    tracing::warn!(node, reason = %e, "node's watches refused; closing its stream");
    let status = match e {
        WatchError::TooMany => Status::resource_exhausted(e.to_string()),
        WatchError::NotOnDemand => Status::failed_precondition(e.to_string()),
        WatchError::NotAWorkload(_) | WatchError::BadAddress(_) => {
            Status::invalid_argument(e.to_string())
        }
    };
    let _ = tokio::time::timeout(SEND_WAIT, tx.send(Err(status))).await;
}

/// Records a node's answer to a version. `cursor` is the version the stream holds the node
/// at: with nothing left unanswered, the node holds all of it (versions after the one answered
/// may have had nothing for it).
fn answer(
    shared: &Shared,
    node: &str,
    in_flight: &mut Vec<(u64, Instant)>,
    rejected: &mut bool,
    cursor: Option<u64>,
    ack: ConfigAck,
) {
    if ack.error.is_empty() {
        tracing::debug!(node, version = ack.version, "config acknowledged");
        let took = answered(in_flight, ack.version);
        shared.metrics.acked(true, took);
        // The stream's own cursor, never the version the node names: a node cannot claim
        // more than it was sent.
        let synced = cursor.filter(|_| in_flight.is_empty() && !*rejected);
        shared.update_node(node, |n| {
            n.acked_version = Some(ack.version);
            n.acked_at = Some(std::time::SystemTime::now());
            if synced.is_some() {
                n.synced_version = synced;
            }
        });
        waiting(shared, node, in_flight);
    } else {
        tracing::warn!(
            node,
            version = ack.version,
            error = ack.error,
            "node rejected config"
        );
        answered(in_flight, ack.version);
        *rejected = true;
        shared.metrics.acked(false, None);
        shared.update_node(node, |n| n.last_nack = Some((ack.version, ack.error)));
        waiting(shared, node, in_flight);
    }
}

/// Records since when the oldest version sent to the node has waited for its answer.
fn waiting(shared: &Shared, node: &str, in_flight: &[(u64, Instant)]) {
    let since = in_flight
        .first()
        .and_then(|(_, sent)| std::time::SystemTime::now().checked_sub(sent.elapsed()));
    shared.update_node(node, |n| n.unanswered_since = since);
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
