//! Outbound: connections an enrolled pod's application made, redirected here by the connect
//! hooks. Each is matched with its original destination and routed by the directory: to a
//! mesh workload on another node through a tunnel, to a pod on this node directly (no TLS,
//! same checks), or, outside the mesh, on unchanged from inside the pod's netns.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};
use mesh_ebpf_common::OUTBOUND_PORT;
use mesh_model::traffic::Connect;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::labels::PairOf as _;
use super::{
    authz::OpenGuard,
    directory::{Directory, Route, ServicePort, Target},
    inbound::{self, Admitted, Delivery},
    relay::{self, reset, Stream},
    traffic::{expiry::Expiry, Limited, Slot},
    PodContext,
};
use crate::metrics::{
    traffic::Attempt, tunnels as tunnel_metrics, Details, FailReason, Outcome, Pair, Reporter,
};
use crate::transport::Transport;
use crate::tunnel::{
    header, pool,
    quic::{self, TunnelStream},
    session::SessionError,
    Session, TlsConfigs, TUNNEL_PORT,
};

/// Longest wait before a retry, however many attempts came before.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Listener addresses inside every pod: the connect hooks rewrite to exactly these.
pub fn listen_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
    ]
}

/// Where an outbound connection was sent.
pub(super) enum Upstream {
    Plain(TcpStream),
    /// A pod of this node, admitted by its checks (which also report it, as its destination).
    Local(TcpStream, OpenGuard, Box<(Pair, Details)>),
    /// Through a tunnel session; it goes back to the pool under this key if it can.
    Tunnel {
        session: Box<Session>,
        key: pool::Key,
        reused: bool,
    },
    /// Through a stream of a QUIC connection.
    Quic {
        stream: Box<TunnelStream>,
        reused: bool,
    },
}

impl Upstream {
    /// How the connection travels, and whether on a tunnel that was there already.
    pub(super) fn transport(&self) -> (Transport, bool) {
        match self {
            Upstream::Plain(_) => (Transport::Passthrough, false),
            Upstream::Local(..) => (Transport::Local, false),
            Upstream::Tunnel { reused, .. } => (Transport::Tls, *reused),
            Upstream::Quic { reused, .. } => (Transport::Quic, *reused),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: SessionError,
    },
    #[error("tunnel header exchange with {addr} failed: {source}")]
    Header {
        addr: SocketAddr,
        source: header::HeaderError,
    },
    #[error("QUIC connection to {addr} failed: {source}")]
    Quic {
        addr: SocketAddr,
        source: quic::QuicError,
    },
    #[error("no HTTP connection to {addr}: {detail}")]
    Http { addr: SocketAddr, detail: String },
    #[error("no answer from {addr} within the connect timeout")]
    Timeout { addr: SocketAddr },
    #[error("the connect timeout passed while waiting for a handshake slot to {addr}'s node on this node")]
    Queued { addr: SocketAddr },
    #[error("the destination refused ({status:?}): {reason}")]
    Refused { status: Status, reason: String },
    #[error("this pod has no certificate yet for {0}")]
    NoSvid(String),
    #[error("no trust bundle from the control plane yet")]
    NoTrust,
    #[error("this pod ({0}) is not in the mesh view")]
    UnknownSource(String),
    #[error("this pod has no {0} address to send from")]
    NoSourceAddress(&'static str),
    #[error("cannot build the TLS client: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the destination at {addr} chains to a trust root that was withdrawn")]
    TrustWithdrawn { addr: SocketAddr },
}

impl SendError {
    /// The bounded reason the metrics give for it.
    fn reason(&self) -> FailReason {
        match self {
            SendError::Connect { .. }
            | SendError::Handshake { .. }
            | SendError::Header { .. }
            | SendError::Quic { .. }
            | SendError::Timeout { .. }
            | SendError::Http { .. }
            | SendError::Queued { .. } => FailReason::Tunnel,
            SendError::Refused { status, .. } => inbound::refusal_reason(*status),
            SendError::TrustWithdrawn { .. } => FailReason::TrustWithdrawn,
            SendError::NoSvid(_)
            | SendError::NoTrust
            | SendError::UnknownSource(_)
            | SendError::NoSourceAddress(_)
            | SendError::Tls(_) => FailReason::NotReady,
        }
    }

    /// A reused session that was gone before the destination read the header: it closed it
    /// while idle (close_notify, or a reset). Only then is the connection sent again on a
    /// new session; after a timeout or a bad record the destination may have acted on it.
    fn stale_session(&self) -> bool {
        match self {
            SendError::Header { source, .. } => match source {
                header::HeaderError::Closed => true,
                header::HeaderError::Session(s) => {
                    matches!(s, SessionError::Truncated | SessionError::Io(_))
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// A tunnel record from the destination failed authentication.
    fn is_tampering(&self) -> bool {
        match self {
            SendError::Header { source, .. } => {
                header::session_error(source).is_some_and(SessionError::is_tampering)
            }
            _ => false,
        }
    }

    /// Whether it says the endpoint is unwell (outlier detection counts it): it could not be
    /// reached, or its application refused. A deny, a rate limit, a limit the destination
    /// keeps for this source (`Overloaded`: one busy pod must not eject an endpoint for every
    /// pod of its node), time spent queued on this node or this node not being ready say
    /// nothing about it.
    pub(super) fn endpoint_failed(&self) -> bool {
        match self {
            SendError::Connect { .. }
            | SendError::Handshake { .. }
            | SendError::Quic { .. }
            | SendError::Header { .. }
            | SendError::Http { .. }
            | SendError::Timeout { .. } => true,
            SendError::Refused { status, .. } => *status == Status::UpstreamFailed,
            _ => false,
        }
    }

    /// What the application may be told (the mesh's answer on an HTTP port): a refusal's
    /// status, not the destination's reasons, whose policy and rule names stay in the logs of
    /// the two nodes.
    pub(super) fn for_client(&self) -> String {
        match self {
            SendError::Refused { status, .. } => format!("the destination refused ({status:?})"),
            e => e.to_string(),
        }
    }

    /// Whether another endpoint of the same service might work: only failures before the
    /// destination accepted the connection are retried, and never a deny or a rate limit.
    pub(super) fn try_next(&self) -> bool {
        match self {
            SendError::Connect { .. }
            | SendError::Handshake { .. }
            | SendError::Quic { .. }
            | SendError::Header { .. }
            | SendError::Timeout { .. }
            | SendError::Http { .. }
            | SendError::Queued { .. }
            | SendError::TrustWithdrawn { .. } => true,
            SendError::Refused { status, .. } => {
                matches!(status, Status::UpstreamFailed | Status::Overloaded)
            }
            _ => false,
        }
    }
}

/// One connection the pod's application made: where it goes ([`Outgoing::accepted`]), a
/// connection there ([`Outgoing::connect`]), then the relay, each reported once.
pub async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let ctx = &*pod;
    let started = Instant::now();
    // The limit logs and counts its own refusals.
    let Ok(_permit) = ctx.shared.limits.outbound(&ctx.load, &ctx.workload) else {
        return reset(client);
    };
    let Some(mut out) = Outgoing::accepted(ctx, peer).await else {
        return reset(client);
    };
    // A port that declares HTTP is served request by request (boxed: an L4 connection's task
    // does not carry it).
    if let Route::Service(port) = out.dir.route(out.dst) {
        if let Some(protocol) = port.protocol {
            let (dst, service) = (out.dst, port.service.clone());
            drop((out, port));
            return Box::pin(super::http::serve(
                client, peer, pod, dst, &service, protocol,
            ))
            .await;
        }
    }
    let _ = client.set_nodelay(true);
    let Some(upstream) = out.connect(ctx, peer).await else {
        return reset(client);
    };
    let metrics = &ctx.shared.metrics;
    let (transport, reused) = upstream.transport();
    metrics.connected(transport, reused, started.elapsed());
    // The relay, inline rather than an `async fn` of its own: a function's arguments would
    // stay in every connection's task beside the copies it moves them into.
    let Outgoing {
        dst,
        pair,
        details,
        held,
        ..
    } = out;
    let mut conn = metrics.opened(Reporter::Source, &pair, *details);
    drop(pair);
    // A Service connection's idle timeout and maximum duration watch it beside the token the
    // relay waits on anyway (a policy change, a withdrawn root).
    let (idle, max) = held
        .as_ref()
        .map_or((Duration::ZERO, Duration::ZERO), |h| (h.idle, h.max));
    let totals = conn.totals();
    let expire = |within| Expiry::start(idle, max, totals.clone(), within);
    let expiry: Option<Expiry>;
    // A delivery on this node is also reported by its destination, in the same relay.
    let mut local = None;
    // A tunnel ends with its destination's root (see tunnel/anchors.rs).
    let trust = match &upstream {
        Upstream::Tunnel { session, .. } => session.withdrawn().cloned(),
        Upstream::Quic { stream, .. } => stream.withdrawn.clone(),
        _ => None,
    };
    let withdrawn = trust.as_ref();
    let (result, pooled) = match upstream {
        Upstream::Plain(s) => {
            expiry = expire(None);
            let closed = expiry.as_ref().map(Expiry::token);
            (
                relay::relay(client, Stream::Plain(s), closed, &conn.traffic).await,
                None,
            )
        }
        Upstream::Local(s, guard, admitted) => {
            let dest = local.insert((inbound::opened(metrics, admitted), guard));
            // The relay holds the client, not the destination's application.
            let traffic = conn.traffic.clone().and(&dest.0.traffic.swapped());
            expiry = expire(Some(dest.1.closed()));
            let closed = expiry.as_ref().map(Expiry::token).or(Some(dest.1.closed()));
            (
                relay::relay(client, Stream::Plain(s), closed, &traffic).await,
                None,
            )
        }
        Upstream::Tunnel { session, key, .. } => {
            expiry = expire(withdrawn);
            let closed = expiry.as_ref().map(Expiry::token).or(withdrawn);
            (
                relay::relay(client, Stream::Tunnel(session), closed, &conn.traffic).await,
                Some(key),
            )
        }
        Upstream::Quic { stream, .. } => {
            expiry = expire(withdrawn);
            let closed = expiry.as_ref().map(Expiry::token).or(withdrawn);
            (
                relay::relay(client, Stream::Quic(stream), closed, &conn.traffic).await,
                None,
            )
        }
    };
    // The limits and the endpoint's load count the connection until here.
    drop(held);
    match result {
        Ok(done) => {
            if let (Some(key), Some(session)) = (pooled, done.session) {
                ctx.shared.tunnels.put(key, session);
            }
        }
        Err(e) => {
            let by_policy = local
                .as_ref()
                .is_some_and(|(_, g)| g.closed().is_cancelled());
            let reason = if let Some(expired) = expiry.as_ref().and_then(Expiry::expired) {
                tracing::debug!(workload = %ctx.workload, %dst, reason = expired.as_str(), "closing an expired connection");
                expired
            } else if by_policy {
                FailReason::ClosedByPolicy
            } else if withdrawn.is_some_and(|w| w.is_cancelled()) {
                // Anchors::keep_only warned once for the root; a QUIC connection may carry
                // thousands of these.
                tracing::debug!(workload = %ctx.workload, %dst, "closing a connection: {}", relay::BY_TRUST);
                FailReason::TrustWithdrawn
            } else {
                FailReason::Reset
            };
            conn.fail(reason);
            if let Some((dest, _)) = local.as_mut() {
                dest.fail(reason);
            }
            relay::log_failure(&ctx.workload, Some(dst), &e);
        }
    }
}

/// An outbound connection as it is routed: where the application asked to go, and who talks
/// to whom for the metrics and the access log.
struct Outgoing {
    dir: Arc<Directory>,
    /// The original destination.
    dst: SocketAddr,
    // Boxed: they live across the connect, and a connection's task stays small.
    pair: Box<Pair>,
    details: Box<Details>,
    /// What a Service connection holds until it ends: its share of the limits and of its
    /// endpoint's load, and its expiry settings.
    held: Option<Box<Held>>,
}

/// See [`Outgoing::held`].
struct Held {
    _open: Slot,
    _endpoint: Slot,
    idle: Duration,
    max: Duration,
}

impl Outgoing {
    /// The connection's original destination and what the directory says of its source;
    /// `None` (reported) when the kernel kept no original destination.
    async fn accepted(ctx: &PodContext, peer: SocketAddr) -> Option<Self> {
        let mut dir = ctx.shared.directory();
        let original = ctx
            .shared
            .capture
            .original_destination(ctx.netns_cookie, peer);
        // On demand, a destination this node was not told about is asked for first.
        if let Some(dst) = original {
            dir = ctx.shared.resolved(dir, |d| d.wanted_for(dst)).await;
        }
        // A pod captured as it starts (Kubernetes) may connect before this node knows its
        // identity: a mesh destination then waits for it rather than fail at once.
        if original.is_some_and(|dst| dir.is_mesh_destination(dst)) {
            dir = ctx.shared.directory_for(&ctx.workload, dir).await;
        }
        let me = dir.peer(&ctx.workload);
        let mut pair = Box::new(
            me.map(|me| Pair::default().with_source(me))
                .unwrap_or_default(),
        );
        let mut details = Box::new(Details {
            connection_id: ctx.shared.connection_id(),
            transport: Transport::Passthrough,
            ..Details::default()
        });
        let Some(dst) = original else {
            ctx.shared.metrics.failed(
                Reporter::Source,
                &pair,
                FailReason::NoOriginalDestination,
                &details,
                "no original destination recorded",
            );
            tracing::warn!(
                workload = %ctx.workload, %peer,
                "no original destination recorded for this connection (original-destination map full?); resetting it"
            );
            return None;
        };
        pair.destination_port = dst.port();
        // The application's address as the destination sees it: the pod's, with its port.
        details.source_address = me
            .and_then(|me| me.address_like(dst.ip()))
            .map(|ip| SocketAddr::new(ip, peer.port()));
        details.destination_address = Some(dst);
        Some(Self {
            dir,
            dst,
            pair,
            details,
            held: None,
        })
    }

    /// A connection to where the directory routes the destination; `None` (reported and
    /// logged) when there is none to be had.
    async fn connect(&mut self, ctx: &PodContext, peer: SocketAddr) -> Option<Upstream> {
        let (dir, dst) = (&*self.dir, self.dst);
        let tunnel = Transport::from(dir.transport());
        let failed = |this: &Self, reason: FailReason, detail: &str| {
            ctx.shared
                .metrics
                .failed(Reporter::Source, &this.pair, reason, &this.details, detail);
        };
        match dir.route(dst) {
            Route::Unresolved => {
                let why = format!(
                    "the control plane did not say within {:?} whether {dst} is in the mesh",
                    super::LOOKUP_WAIT
                );
                failed(self, FailReason::Unresolved, &why);
                tracing::warn!(
                    workload = %ctx.workload, %peer, %dst,
                    "{why}; resetting the client connection rather than pass it around the mesh"
                );
                None
            }
            Route::Passthrough => match ctx.connect_in_pod(dst).await {
                Ok(s) => Some(Upstream::Plain(s)),
                Err(e) => {
                    failed(self, FailReason::UpstreamConnect, &e.to_string());
                    tracing::info!(
                        workload = %ctx.workload, %peer, %dst, error = %e,
                        "upstream connect failed; resetting the client connection"
                    );
                    None
                }
            },
            Route::Workload(target) => {
                to_target(&mut self.pair, &target);
                self.details.destination_address = Some(target.addr);
                self.details.transport = if ctx.shared.local.get(&target.peer.key).is_some() {
                    Transport::Local
                } else {
                    tunnel
                };
                let id = self.details.connection_id;
                self.details.attempts = 1;
                let deadline = tokio::time::Instant::now() + Connect::default().timeout;
                match Box::pin(send(ctx, dir, &target, peer, id, deadline)).await {
                    Ok(up) => Some(up),
                    Err(e) => {
                        failed(self, e.reason(), &e.to_string());
                        ctx.shared.tunnel_metrics.count(Outcome::OutFailed);
                        tracing::info!(
                            workload = %ctx.workload, %dst, destination = %target.peer.key, error = %e,
                            "cannot reach the destination; resetting the client connection"
                        );
                        None
                    }
                }
            }
            Route::Service(port) => {
                self.pair.destination_service.clone_from(&port.service);
                self.details.transport = tunnel;
                let sent =
                    send_to_service(ctx, dir, &port, dst, peer, &self.pair, &mut self.details);
                match Box::pin(sent).await {
                    Ok(Sent {
                        upstream,
                        target,
                        held,
                    }) => {
                        to_target(&mut self.pair, &target);
                        self.details.destination_address = Some(target.addr);
                        if matches!(upstream, Upstream::Local(..)) {
                            self.details.transport = Transport::Local;
                        }
                        self.held = Some(held);
                        Some(upstream)
                    }
                    Err(NotSent { reason, detail }) => {
                        failed(self, reason, &detail);
                        tracing::info!(
                            workload = %ctx.workload, %dst, service = %port.service, %detail,
                            "cannot reach the service; resetting the client connection"
                        );
                        None
                    }
                }
            }
        }
    }
}

/// The pair's destination is `target`'s workload, on the port it listens on.
pub(super) fn to_target(pair: &mut Pair, target: &Target) {
    pair.destination_port = target.addr.port();
    *pair = std::mem::take(pair).with_destination(&target.peer);
}

/// A connection made to a Service: where it went, and what it holds until it ends.
struct Sent {
    upstream: Upstream,
    target: Target,
    held: Box<Held>,
}

/// Why a connection to a Service was not made, for the metrics and the access log.
struct NotSent {
    reason: FailReason,
    detail: String,
}

/// Sends a connection to a Service port: a backend by the route's weights, the traffic
/// settings for this source, the limits, then endpoints in the balancer's order, one attempt
/// each (round again when there are fewer endpoints than attempts) until one accepts.
async fn send_to_service(
    ctx: &PodContext,
    dir: &Directory,
    port: &ServicePort,
    dst: SocketAddr,
    peer: SocketAddr,
    pair: &Pair,
    details: &mut Details,
) -> Result<Sent, NotSent> {
    let not_sent = |reason, detail: String| NotSent { reason, detail };
    let traffic = &ctx.shared.traffic;
    let backend = port.pick(dst.ip(), fastrand::u64(..)).ok_or_else(|| {
        let detail = format!(
            "no endpoint of {} takes {} connections",
            port.service,
            family(dst.ip())
        );
        not_sent(FailReason::NoEndpoint, detail)
    })?;
    if let Some(route) = &port.route {
        details.backend.clone_from(&backend.name);
        traffic.metrics.routed(route, &port.service, &backend.name);
    }
    let settings = backend.settings_for(dir.peer(&ctx.workload).map(|p| &**p), dst.ip());
    let state = traffic.service(backend);
    let (open, pending) = state
        .admit(&settings.connection_limits.value)
        .map_err(|limited| {
            let (reason, detail) = match limited {
                Limited::Connections(n) => (
                    FailReason::ConnectionLimit,
                    format!("{n} connections to {} open from this node (connectionLimits.maxConnections)", backend.name),
                ),
                Limited::Pending(n) => (
                    FailReason::PendingLimit,
                    format!("{n} connects to {} in progress from this node (connectionLimits.maxPendingConnects)", backend.name),
                ),
            };
            tracing::warn!(workload = %ctx.workload, service = %backend.name, %detail, "connection refused by a limit");
            not_sent(reason, detail)
        })?;
    let od = &settings.outlier_detection.value;
    let targets = backend.targets(dst.ip());
    let endpoints = targets.len();
    let order = state.order(targets, settings.load_balancer.value, od, backend.turn());
    let connect = settings.connect.value;
    let mut last = None;
    for attempt in 0..connect.max_attempts {
        let Some(candidate) = order.get(attempt as usize % order.len().max(1)) else {
            break;
        };
        if attempt > 0 {
            traffic
                .metrics
                .retry(&pair.source_workload, &pair.source_namespace, &backend.name);
            let wait = connect
                .backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        details.attempts = attempt + 1;
        let target = &candidate.target;
        let endpoint = candidate.hold();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + connect.timeout;
        let id = details.connection_id;
        let result = tokio::time::timeout_at(deadline, send(ctx, dir, target, peer, id, deadline))
            .await
            .unwrap_or(Err(SendError::Timeout { addr: target.addr }));
        let labels = Attempt {
            source_workload: &pair.source_workload,
            source_namespace: &pair.source_namespace,
            service: &backend.name,
            destination_workload: super::labels::workload_of(&target.peer),
            destination_namespace: &target.peer.key.namespace,
        };
        traffic.metrics.attempt(&labels, result.is_ok());
        match result {
            Ok(upstream) => {
                state.succeeded(&target.peer.key, started.elapsed());
                drop(pending);
                return Ok(Sent {
                    upstream,
                    target: target.clone(),
                    held: Box::new(Held {
                        _open: open,
                        _endpoint: endpoint,
                        idle: settings.idle_timeout.value,
                        max: settings.max_connection_duration.value,
                    }),
                });
            }
            Err(e) => {
                tracing::info!(
                    workload = %ctx.workload, service = %backend.name, endpoint = %target.peer.key,
                    addr = %target.addr, attempt = attempt + 1, error = %e, "service endpoint failed"
                );
                ctx.shared.tunnel_metrics.count(Outcome::OutFailed);
                if e.endpoint_failed() {
                    if let Some(out) = state.failed(&target.peer.key, od, endpoints) {
                        tracing::warn!(
                            service = %backend.name, endpoint = %target.peer.key,
                            ejected_for = %mesh_model::duration::format(out),
                            "endpoint ejected after consecutive connect failures (outlier detection)"
                        );
                    }
                }
                if !e.try_next() {
                    return Err(not_sent(e.reason(), e.to_string()));
                }
                last = Some(e);
            }
        }
    }
    let detail = match last {
        Some(e) => format!(
            "no endpoint of {} could be reached in {} attempts; the last: {e}",
            backend.name, details.attempts
        ),
        None => format!("{} has no endpoint to try", backend.name),
    };
    Err(not_sent(FailReason::NoEndpoint, detail))
}

/// Sends one connection to a mesh workload: directly when it is a pod on this node, through a
/// tunnel otherwise.
pub(super) async fn send(
    ctx: &PodContext,
    dir: &Directory,
    target: &Target,
    app_peer: SocketAddr,
    id: u64,
    deadline: tokio::time::Instant,
) -> Result<Upstream, SendError> {
    let me = &ctx.workload;
    let source = dir
        .peer(me)
        .ok_or_else(|| SendError::UnknownSource(me.to_string()))?;
    let source_ip = source
        .address_like(target.addr.ip())
        .ok_or(SendError::NoSourceAddress(family(target.addr.ip())))?;
    let delivery = Delivery {
        source_identity: source.identity.clone(),
        source: SocketAddr::new(source_ip, app_peer.port()),
        destination: target.addr,
        connection_id: id,
        transport: Transport::Local,
        tunnel_trust: None,
    };
    if let Some(local) = ctx.shared.local.get(&target.peer.key) {
        let Admitted {
            upstream,
            guard,
            report,
        } = inbound::deliver(&local, dir, &delivery)
            .await
            .map_err(|r| SendError::Refused {
                status: r.status,
                reason: r.reason,
            })?;
        tracing::debug!(workload = %me, destination = %target.peer.key, addr = %target.addr, id = delivery.connection_id, "delivered on this node");
        return Ok(Upstream::Local(upstream, guard, report));
    }
    let tls = dir.tls().ok_or(SendError::NoTrust)?;
    let source_id = source.identity.to_string();
    let Some(source_serial) = tls.svid_serial(&source_id) else {
        return Err(SendError::NoSvid(source_id));
    };
    let addr = SocketAddr::new(target.addr.ip(), TUNNEL_PORT);
    let key = pool::Key {
        source: me.clone(),
        source_serial,
        destination: addr,
        identity: target.peer.identity.clone(),
        trust: tls.trust_fingerprint(),
    };
    let request = TunnelRequest {
        destination_address: mesh_api::ip_to_bytes(target.addr.ip()),
        destination_port: u32::from(target.addr.port()),
        source_address: mesh_api::ip_to_bytes(source_ip),
        source_port: u32::from(app_peer.port()),
        connection_id: delivery.connection_id,
    };
    if dir.transport() == mesh_model::Transport::Quic {
        let config = tls.client(&source_id, target.peer.identity.clone())?;
        let (stream, reused) = send_quic(ctx, &key, (config, tls), &request, deadline).await?;
        tracing::debug!(workload = %me, destination = %target.peer.key, %addr, id = delivery.connection_id, "QUIC stream open");
        return Ok(Upstream::Quic { stream, reused });
    }
    // A pooled session first; else a place among the handshakes in flight to the node, and
    // the pool again (a session may have come back meanwhile); else a new session; all of it
    // before the attempt's deadline.
    let mut gate = None;
    loop {
        if let Some(session) = ctx.shared.tunnels.take(&key) {
            let answer = tokio::time::timeout_at(deadline, exchange(session, &request, addr));
            match answer.await.unwrap_or(Err(SendError::Timeout { addr })) {
                Ok(session) => {
                    let tunnels = &ctx.shared.tunnel_metrics;
                    tunnels.count(Outcome::OutOpened);
                    tunnels.count(Outcome::OutReused);
                    tracing::debug!(workload = %me, destination = %target.peer.key, %addr, id = delivery.connection_id, "tunnel session reused");
                    return Ok(Upstream::Tunnel {
                        session,
                        key,
                        reused: true,
                    });
                }
                // The destination closed the idle session first: make a new one.
                Err(e) if e.stale_session() => {
                    tracing::debug!(workload = %me, %addr, error = %e, "an idle tunnel session is gone; opening a new one")
                }
                Err(e) if e.is_tampering() => {
                    tracing::warn!(workload = %me, %addr, error = %e, "a record on a reused tunnel session failed authentication (tampered with or corrupted on the way)");
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        if gate.is_some() {
            break;
        }
        let gated = ctx.shared.tunnels.gate(&key, &target.peer.node);
        let wait = tokio::time::timeout_at(deadline, gated);
        gate = Some(wait.await.map_err(|_| SendError::Queued { addr })?);
    }
    let config = tls.client(&source_id, target.peer.identity.clone())?;
    let tcp = tokio::time::timeout_at(deadline, ctx.connect_in_pod(addr))
        .await
        .map_err(|_| SendError::Timeout { addr })?
        .map_err(|source| SendError::Connect { addr, source })?;
    let name = ServerName::IpAddress(target.addr.ip().into());
    let open = async {
        let (mut session, chain) = Session::connect(config, name, tcp)
            .await
            .map_err(|source| SendError::Handshake { addr, source })?;
        // A destination whose root is withdrawn loses the connections it carries, as a
        // source does at the destination (inbound.rs): the mesh no longer vouches for it.
        let withdrawn = ctx.shared.anchors.watch_chain(&chain, tls);
        drop(chain);
        if withdrawn.is_cancelled() {
            return Err(SendError::TrustWithdrawn { addr });
        }
        session.watch(withdrawn);
        let tunnels = &ctx.shared.tunnel_metrics;
        session.track(tunnels.opened(tunnel_metrics::Direction::Out, mesh_model::Transport::Tls));
        exchange(session, &request, addr).await
    };
    let session = tokio::time::timeout_at(deadline, open)
        .await
        .map_err(|_| SendError::Timeout { addr })??;
    ctx.shared.tunnel_metrics.count(Outcome::OutOpened);
    tracing::debug!(workload = %me, destination = %target.peer.key, %addr, id = delivery.connection_id, "tunnel open");
    Ok(Upstream::Tunnel {
        session,
        key,
        reused: false,
    })
}

/// Opens a stream for one connection on the pod pair's QUIC connection (making one if
/// needed) and exchanges the header on it. A pooled connection that fails before the
/// destination answered is replaced by a new one, once. `tls` is the client configuration
/// and the bundle it was made from.
async fn send_quic(
    ctx: &PodContext,
    key: &pool::Key,
    (tls, trust): (Arc<rustls::ClientConfig>, &TlsConfigs),
    request: &TunnelRequest,
    deadline: tokio::time::Instant,
) -> Result<(Box<TunnelStream>, bool), SendError> {
    let addr = key.destination;
    let endpoint = ctx.quic.as_ref().ok_or(SendError::Quic {
        addr,
        source: quic::QuicError::NoEndpoint,
    })?;
    let mut fresh = false;
    loop {
        let dial = quic::Dial {
            endpoint,
            addr,
            tls: tls.clone(),
            metrics: &ctx.shared.tunnel_metrics,
            trust,
            anchors: &ctx.shared.anchors,
        };
        let attempt =
            async {
                let (mut stream, made) = ctx.shared.quic.open(key, dial, fresh).await.map_err(
                    |source| match source {
                        quic::QuicError::TrustWithdrawn => SendError::TrustWithdrawn { addr },
                        source => SendError::Quic { addr, source },
                    },
                )?;
                let header = async {
                    header::write_stream(&mut stream.send, request).await?;
                    header::read_stream::<TunnelResponse>(&mut stream.recv).await
                };
                let (response, early) = header
                    .await
                    .map_err(|source| SendError::Header { addr, source })?;
                stream.early = early;
                match response.status() {
                    Status::Ok => Ok((stream, made)),
                    status => Err(SendError::Refused {
                        status,
                        reason: response.reason,
                    }),
                }
            };
        let outcome = tokio::time::timeout_at(deadline, attempt)
            .await
            .unwrap_or(Err(SendError::Timeout { addr }));
        match outcome {
            Ok((stream, made)) => {
                let tunnels = &ctx.shared.tunnel_metrics;
                tunnels.count(Outcome::OutOpened);
                tunnels.count(if made {
                    Outcome::QuicOutOpened
                } else {
                    Outcome::OutReused
                });
                return Ok((Box::new(stream), !made));
            }
            Err(
                e @ (SendError::Refused { .. }
                | SendError::Timeout { .. }
                | SendError::TrustWithdrawn { .. }),
            ) => return Err(e),
            // The pooled connection failed before the destination answered (it closed it, or
            // refused the stream): one more try on a new one.
            Err(e) if !fresh => {
                tracing::debug!(%addr, error = %e, "a pooled QUIC connection failed; opening a new one");
                fresh = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends the header and reads the destination's answer (the caller bounds the time).
async fn exchange(
    mut session: Box<Session>,
    request: &TunnelRequest,
    addr: SocketAddr,
) -> Result<Box<Session>, SendError> {
    session.carry();
    header::write(&mut session, request)
        .await
        .map_err(|e| SendError::Header {
            addr,
            source: e.into(),
        })?;
    let response: TunnelResponse = header::read(&mut session)
        .await
        .map_err(|source| SendError::Header { addr, source })?;
    match response.status() {
        Status::Ok => Ok(session),
        status => Err(SendError::Refused {
            status,
            reason: response.reason,
        }),
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}
