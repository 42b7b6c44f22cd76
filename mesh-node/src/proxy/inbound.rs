//! Inbound: deliveries to a pod on this node. A tunnel from another node arrives on the pod's
//! listener at :15008 (TLS with the pod's SVID, client certificate required); a connection from
//! a pod on this node arrives from the outbound side without TLS. Both pass [`deliver`]: the
//! destination's checks, then a connection to the application from inside the pod's netns.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};
use mesh_ebpf_common::PLAINTEXT_PORT;
use mesh_model::SpiffeId;
use tokio::net::TcpStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    authz::{self, OpenGuard},
    directory::Directory,
    relay::{self, reset},
    PodContext,
};
use crate::metrics::{
    tunnels as tunnel_metrics, Connection, ConnectionMetrics, Details, FailReason, Pair, Reporter,
};
use crate::transport::Transport;
use crate::tunnel::{
    anchors::Credentials,
    header::{self, HeaderError},
    pool, quic,
    tls::{peer_identity, serial},
    Session, TUNNEL_PORT,
};

/// Limit for the TLS handshake plus the client's header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The tunnel listener's addresses inside every pod.
pub fn listen_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::from(([0, 0, 0, 0], TUNNEL_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, TUNNEL_PORT)),
    ]
}

/// The plaintext listener's addresses inside every pod; the inbound program hands it
/// plaintext connections to the pod in PERMISSIVE mode.
pub fn plaintext_listen_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::from(([0, 0, 0, 0], PLAINTEXT_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, PLAINTEXT_PORT)),
    ]
}

/// One connection for a local pod, as the destination's checks see it.
#[derive(Debug)]
pub struct Delivery {
    /// Verified: from the tunnel's client certificate, or this node's own view for a local pod.
    pub source_identity: SpiffeId,
    /// The application's source address and port.
    pub source: SocketAddr,
    /// Address and port in the destination pod.
    pub destination: SocketAddr,
    pub connection_id: u64,
    /// How it arrived: through a tunnel, or from a pod of this node.
    pub transport: Transport,
    /// For a tunnelled connection: its tunnel's token, cancelled when the trust root of the
    /// tunnel's peer is withdrawn; the connection ends with it.
    pub tunnel_trust: Option<CancellationToken>,
}

impl Delivery {
    fn details(&self) -> Details {
        Details {
            connection_id: self.connection_id,
            source_address: Some(self.source),
            destination_address: Some(self.destination),
            transport: self.transport,
            ..Details::default()
        }
    }
}

/// Why a delivery was not made; sent back to a tunnel client and logged.
#[derive(Debug)]
pub struct Refusal {
    pub status: Status,
    pub reason: String,
    /// The deciding policy and rule of a deny (boxed: a refusal is rare, and travels in
    /// results that connection tasks hold).
    pub decided: Option<Box<(String, String)>>,
}

impl Refusal {
    fn new(status: Status, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            decided: None,
        }
    }

    /// Counts and logs the refusal of a connection with `pair` and `details`.
    fn report(&self, pod: &PodContext, pair: &Pair, mut details: Details) {
        if let Some(decided) = &self.decided {
            details.policy.clone_from(&decided.0);
            details.rule.clone_from(&decided.1);
        }
        pod.shared.metrics.failed(
            Reporter::Destination,
            pair,
            self.reason(),
            &details,
            &self.reason,
        );
    }
}

/// A delivery that passed the checks: the connection to the application, and the registration
/// that lets a later policy change close it.
pub struct Admitted {
    pub upstream: TcpStream,
    pub guard: OpenGuard,
    /// Who talks to whom and how, for the metrics and the access log (boxed: connection
    /// tasks stay small).
    pub report: Box<(Pair, Details)>,
}

impl Refusal {
    fn reason(&self) -> FailReason {
        refusal_reason(self.status)
    }
}

/// The bounded reason the metrics give for a refusal with `status`, at either end.
pub fn refusal_reason(status: Status) -> FailReason {
    match status {
        Status::Denied => FailReason::Denied,
        Status::UpstreamFailed => FailReason::UpstreamConnect,
        Status::Overloaded => FailReason::Overloaded,
        _ => FailReason::Refused,
    }
}

/// Opens the destination's report (metrics now, the access log at close) of an admitted
/// connection. The pair is dropped here: only the shared series stay with the connection.
pub fn opened(metrics: &Arc<ConnectionMetrics>, report: Box<(Pair, Details)>) -> Box<Connection> {
    let (pair, details) = *report;
    metrics.opened(Reporter::Destination, &pair, details)
}

/// The workload pair of a delivery to `pod`, as its destination sees it: the source is the
/// workload at the source address if it holds the verified identity, else just the identity.
fn pair_at_destination(
    pod: &PodContext,
    dir: &Directory,
    source_identity: Option<&SpiffeId>,
    source: IpAddr,
    destination_port: u16,
) -> Pair {
    let mut pair = match dir.peer(&pod.workload) {
        Some(me) => Pair::default().with_destination(me),
        None => Pair {
            destination_workload: pod.workload.name.clone(),
            destination_pod: pod.workload.name.clone(),
            destination_namespace: pod.workload.namespace.clone(),
            ..Pair::default()
        },
    };
    if let Some(id) = source_identity {
        match dir.peer_by_addr(source).filter(|p| &p.identity == id) {
            Some(peer) => pair = pair.with_source(peer),
            None => {
                pair.source_identity = id.to_string();
                pair.source_namespace.clone_from(&id.namespace);
            }
        }
    }
    pair.destination_port = destination_port;
    pair
}

/// The destination's checks for `d` into `pod` (addresses, identity, then policy), then a
/// connection to its application.
pub async fn deliver(pod: &PodContext, dir: &Directory, d: &Delivery) -> Result<Admitted, Refusal> {
    let pair = pair_at_destination(
        pod,
        dir,
        Some(&d.source_identity),
        d.source.ip(),
        d.destination.port(),
    );
    let outcome = checked_delivery(pod, dir, d, pair.clone()).await;
    if let Err(r) = &outcome {
        r.report(pod, &pair, d.details());
    }
    outcome
}

async fn checked_delivery(
    pod: &PodContext,
    dir: &Directory,
    d: &Delivery,
    pair: Pair,
) -> Result<Admitted, Refusal> {
    check_destination(pod, dir, d.destination)?;
    let source = dir.peer_by_addr(d.source.ip()).ok_or_else(|| {
        Refusal::new(
            Status::Denied,
            format!("source address {} is not a mesh workload", d.source.ip()),
        )
    })?;
    if source.identity != d.source_identity {
        return Err(Refusal::new(
            Status::Denied,
            format!(
                "source address {} belongs to {} ({}), not to {}",
                d.source.ip(),
                source.key,
                source.identity,
                d.source_identity
            ),
        ));
    }
    let request = authz::Request {
        destination: pod.workload.clone(),
        destination_addr: d.destination,
        source_addr: d.source,
        source_identity: Some(d.source_identity.clone()),
        connection_id: d.connection_id,
    };
    authorize_and_connect(pod, request, d.tunnel_trust.as_ref(), pair, d.details()).await
}

/// The destination must be an address (and a port) of this pod.
fn check_destination(
    pod: &PodContext,
    dir: &Directory,
    destination: SocketAddr,
) -> Result<(), Refusal> {
    let key = &pod.workload;
    let me = dir.peer(key).ok_or_else(|| {
        Refusal::new(
            Status::BadRequest,
            format!("{key} is not in this node's mesh view"),
        )
    })?;
    if !me.addresses.contains(&destination.ip()) || destination.port() == 0 {
        return Err(Refusal::new(
            Status::BadRequest,
            format!("{destination} is not an address of {key}"),
        ));
    }
    if super::RESERVED_PORTS.contains(&destination.port()) {
        return Err(Refusal::new(
            Status::BadRequest,
            format!(
                "port {} of {key} is the mesh's own listener, not the application's",
                destination.port()
            ),
        ));
    }
    Ok(())
}

/// The policy check every delivery ends with, then the connection to the application. The
/// connection's token (see [`OpenGuard`]) is a child of `within`, when given.
async fn authorize_and_connect(
    pod: &PodContext,
    request: authz::Request,
    within: Option<&CancellationToken>,
    pair: Pair,
    mut details: Details,
) -> Result<Admitted, Refusal> {
    // Registered before the check, which reads the newest policies: a change that lands after
    // the check finds the registration and re-checks it.
    let authz = &pod.shared.authz;
    let guard = authz.admit(request.clone(), within);
    let decision = authz.check(&pod.shared.directory(), &request);
    details.policy = decision.policy_name();
    details.rule = decision.rule_name();
    if !decision.allowed {
        let mut refusal = Refusal::new(Status::Denied, decision.to_string());
        refusal.decided = Some(Box::new((details.policy, details.rule)));
        return Err(refusal);
    }
    let destination = request.destination_addr;
    let upstream = pod.connect_in_pod(destination).await.map_err(|e| {
        pod.shared
            .stats
            .upstream_failed
            .fetch_add(1, Ordering::Relaxed);
        Refusal::new(
            Status::UpstreamFailed,
            format!("connect to {destination} failed: {e}"),
        )
    })?;
    Ok(Admitted {
        upstream,
        guard,
        report: Box::new((pair, details)),
    })
}

/// One tunnel from another node.
pub async fn handle(tcp: TcpStream, peer: SocketAddr, ctx: Arc<PodContext>) {
    let ctx = &*ctx;
    let stats = &ctx.shared.stats;
    let refused = |reason: &dyn std::fmt::Display| {
        stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(workload = %ctx.workload, %peer, %reason, "tunnel refused");
    };
    // Before anything else: the limits log their own refusals, once in a while.
    let limits = &ctx.shared.limits;
    let stranger = ctx.shared.directory().peer_by_addr(peer.ip()).is_none();
    let Ok(permit) = limits.handshake(&ctx.load, &ctx.workload, peer.ip(), stranger) else {
        stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
        return reset(tcp);
    };
    // Boxed, as the credentials below.
    let mut permit = Box::new(permit);
    let _ = tcp.set_nodelay(true);
    let dir = ctx.shared.directory();
    let (Some(me), Some(tls)) = (dir.peer(&ctx.workload), dir.tls()) else {
        refused(&"this node has no mesh view or trust bundle for the pod yet");
        reset(tcp);
        return;
    };
    let local_id = me.identity.to_string();
    if !tls.has_svid(&local_id) {
        refused(&format!("this node has no certificate for {local_id} yet"));
        reset(tcp);
        return;
    }
    let config = match tls.server(&local_id) {
        Ok(c) => c,
        Err(e) => {
            refused(&format!("cannot build the TLS server: {e}"));
            reset(tcp);
            return;
        }
    };
    // One bound for the handshake and the first header together.
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let accept = Session::accept(config, tcp);
    let (mut stream, peer_certs) = match Box::pin(tokio::time::timeout_at(deadline, accept)).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => return refused(&format!("TLS handshake failed: {e}")),
        Err(_) => return refused(&format!("no handshake within {HANDSHAKE_TIMEOUT:?}")),
    };
    stream.track(
        ctx.shared
            .tunnel_metrics
            .opened(tunnel_metrics::Direction::In, mesh_model::Transport::Tls),
    );
    let client = match peer_identity(Some(&peer_certs)) {
        Ok(id) => id,
        // The verifier already required a SPIFFE ID; this is a belt-and-braces check.
        Err(e) => return refused(&format!("no client identity: {e}")),
    };
    let client_serial = peer_certs.first().and_then(serial).unwrap_or_default();
    // Boxed: the session's task keeps only a pointer to what it holds for its life.
    let credentials = Box::new(Credentials::of(&peer_certs, tls, &ctx.shared.anchors));
    drop(peer_certs);
    // One connection after another on the same session (see tunnel/pool.rs); each header is
    // checked as a new tunnel's would be, and the session takes none once its handshake is
    // too old, its client's certificate has expired or its root was withdrawn.
    let mut first = true;
    loop {
        let wait = if first {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            let left = credentials
                .usable_until
                .saturating_duration_since(Instant::now());
            pool::SERVER_IDLE.min(left)
        };
        // Boxed: only the relay's state stays in the connection's task for its life.
        let read = Box::pin(async {
            tokio::select! {
                read = tokio::time::timeout(wait, header::read(&mut stream)) => Some(read),
                () = credentials.withdrawn.cancelled() => None,
            }
        })
        .await;
        let Some(read) = read else {
            tracing::warn!(workload = %ctx.workload, %peer, %client, "closing a tunnel session: {}", relay::BY_TRUST);
            return reset(stream);
        };
        let request: TunnelRequest = match read {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => {
                match no_header(&e, first) {
                    NoHeader::Closed => {
                        let _ = stream.close().await;
                    }
                    NoHeader::Gone => {
                        tracing::debug!(workload = %ctx.workload, %peer, error = %e, "an idle tunnel session ended");
                        reset(stream);
                    }
                    NoHeader::Tampered => {
                        refused(&format!(
                            "a record from {client} failed authentication (tampered with or corrupted on the way): {e}"
                        ));
                        stream.abort(header::session_error(&e));
                    }
                    NoHeader::Invalid => {
                        refused(&format!("no valid tunnel header: {e}"));
                        stream.abort(header::session_error(&e));
                    }
                }
                return;
            }
            Err(_) if first => {
                return refused(&format!("no tunnel header within {HANDSHAKE_TIMEOUT:?}"))
            }
            // The idle session stayed idle too long, or reached the end of its use.
            Err(_) => {
                let _ = stream.close().await;
                return;
            }
        };
        if !credentials.usable() {
            // The client retries on a new session when a reused one closes unanswered.
            tracing::debug!(workload = %ctx.workload, %peer, %client, "a header on a session past its use; closing it");
            let _ = stream.close().await;
            return;
        }
        if first {
            if let Err(limit) = permit.opened(&ctx.workload) {
                stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
                let reason = format!("this node is at its {limit} limit");
                let _ = header::write(&mut stream, &response(Status::Overloaded, &reason)).await;
                let _ = stream.close().await;
                return;
            }
        }
        first = false;
        stream.carry();
        // Boxed, like the handshake: the connection's task keeps only the relay's state while
        // it lives.
        match Box::pin(admit_tunnel(
            ctx,
            &dir,
            &request,
            &client,
            peer.ip(),
            Transport::Tls,
            &credentials.withdrawn,
        ))
        .await
        {
            Ok((
                d,
                Admitted {
                    upstream,
                    guard,
                    report,
                },
            )) => {
                let mut conn = opened(&ctx.shared.metrics, report);
                if let Err(e) = header::write(&mut stream, &response(Status::Ok, "")).await {
                    conn.fail(FailReason::Reset);
                    refused(&format!("the client went away: {e}"));
                    reset(upstream);
                    return;
                }
                stats.tunnels_in.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    workload = %ctx.workload, client = %client, %client_serial, source = %d.source,
                    destination = %d.destination, id = d.connection_id, transport = %Transport::Tls,
                    "tunnel accepted"
                );
                let relayed = relay_tunnel(
                    ctx,
                    &peer,
                    stream,
                    upstream,
                    (&guard, &credentials),
                    &mut conn,
                );
                match relayed.await {
                    Some(session) => stream = session,
                    None => return,
                }
            }
            Err(refusal) => {
                stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    workload = %ctx.workload, %peer, client = %client, id = request.connection_id,
                    status = ?refusal.status, reason = %refusal.reason, "tunnel refused"
                );
                let _ =
                    header::write(&mut stream, &response(refusal.status, &refusal.reason)).await;
                let _ = stream.close().await;
                return;
            }
        }
    }
}

/// The checks of one tunnelled connection: a well-formed header, sent from the address of
/// the workload it names as the source, then [`deliver`].
async fn admit_tunnel(
    ctx: &PodContext,
    dir: &Directory,
    request: &TunnelRequest,
    client: &SpiffeId,
    peer: IpAddr,
    transport: Transport,
    trust: &CancellationToken,
) -> Result<(Delivery, Admitted), Refusal> {
    let checked = parse(request, client.clone(), transport).and_then(|mut d| {
        check_tunnel_source(dir, peer, &d)?;
        d.tunnel_trust = Some(trust.clone());
        Ok(d)
    });
    let d = match checked {
        Ok(d) => d,
        Err(r) => {
            let port = u16::try_from(request.destination_port).unwrap_or(0);
            let pair = pair_at_destination(ctx, dir, Some(client), peer, port);
            let details = Details {
                connection_id: request.connection_id,
                transport,
                ..Details::default()
            };
            r.report(ctx, &pair, details);
            return Err(r);
        }
    };
    let admitted = deliver(ctx, dir, &d).await?;
    Ok((d, admitted))
}

/// Accepts QUIC tunnels on the pod's endpoint until `shutdown` fires. The endpoint presents
/// the pod's current certificate and trusts the current bundle: its server configuration
/// follows the directory. Connections outlive this loop (they end with the peer, or when the
/// pod leaves the mesh and the endpoint is closed), so a pod that is enrolled again keeps
/// its open tunnels, as with TLS.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    ctx: Arc<PodContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut directory = ctx.shared.directory.clone();
    let mut serving = None;
    loop {
        if !shutdown.is_cancelled() {
            let dir = directory.borrow_and_update().clone();
            set_quic_server(&endpoint, &ctx, &dir, &mut serving);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = directory.changed() => if changed.is_err() { return },
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(handle_quic(incoming, ctx.clone(), tracker.clone()));
                }
                None => return,
            },
        }
    }
}

/// Gives the endpoint the server configuration for the pod's identity under the current trust
/// bundle, if that is not what it has (`serving`); no configuration (new connections refused)
/// while the view lacks either.
fn set_quic_server(
    endpoint: &quinn::Endpoint,
    ctx: &PodContext,
    dir: &Directory,
    serving: &mut Option<(u64, SpiffeId)>,
) {
    let current = dir.peer(&ctx.workload).zip(dir.tls());
    let wanted = current.map(|(me, tls)| (tls.trust_fingerprint(), me.identity.clone()));
    if wanted == *serving {
        return;
    }
    let config = current.and_then(|(me, tls)| {
        let built = tls
            .server(&me.identity_uri)
            .map_err(|e| e.to_string())
            .and_then(|c| quic::server_config(c).map_err(|e| e.to_string()));
        built
            .inspect_err(|e| tracing::error!(workload = %ctx.workload, error = %e, "cannot build the QUIC server; QUIC tunnels to the pod are refused"))
            .ok()
    });
    endpoint.set_server_config(config);
    *serving = wanted;
}

/// One QUIC connection from another node: the handshake, then a task per stream (each one
/// application connection, checked like a TLS tunnel).
async fn handle_quic(incoming: quinn::Incoming, ctx: Arc<PodContext>, tracker: TaskTracker) {
    let peer = incoming.remote_address();
    let peer_ip = peer.ip().to_canonical();
    let stats = &ctx.shared.stats;
    let refused = |reason: &dyn std::fmt::Display| {
        stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(workload = %ctx.workload, %peer, %reason, "QUIC tunnel refused");
    };
    let limits = &ctx.shared.limits;
    let stranger = ctx.shared.directory().peer_by_addr(peer_ip).is_none();
    // A QUIC Initial's source address can be forged: before it counts against anyone's
    // allowance, a stranger (or anyone while the pod is busy) proves it with a Retry.
    if !incoming.remote_address_validated()
        && incoming.may_retry()
        && (stranger || limits.under_pressure(&ctx.load))
    {
        let _ = incoming.retry();
        return;
    }
    let Ok(mut permit) = limits.handshake(&ctx.load, &ctx.workload, peer_ip, stranger) else {
        stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
        return incoming.refuse();
    };
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return refused(&format!("QUIC handshake failed: {e}")),
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return refused(&format!("QUIC handshake failed: {e}")),
        Err(_) => return refused(&format!("no QUIC handshake within {HANDSHAKE_TIMEOUT:?}")),
    };
    // The connection counts as open while it lives, and each of its streams too.
    if permit.opened(&ctx.workload).is_err() {
        conn.close(quic::code::DONE, b"overloaded");
        stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Held until the connection ends: `accept_bi` fails then.
    let tunnel = ctx
        .shared
        .tunnel_metrics
        .opened(tunnel_metrics::Direction::In, mesh_model::Transport::Quic);
    let certs = quic::peer_certificates(&conn);
    let client = match peer_identity(Some(&certs)) {
        Ok(id) => id,
        Err(e) => {
            conn.close(quic::code::DONE, b"no client identity");
            return refused(&format!("no client identity: {e}"));
        }
    };
    let client_serial = certs.first().and_then(serial).unwrap_or_default();
    let Some(credentials) = ctx
        .shared
        .directory()
        .tls()
        .map(|tls| Credentials::of(&certs, tls, &ctx.shared.anchors))
    else {
        conn.close(quic::code::DONE, b"no trust bundle");
        return refused(&"this node has no trust bundle any more");
    };
    drop(certs);
    stats.quic_connections_in.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(workload = %ctx.workload, %peer, %client, "QUIC connection accepted");
    let from = Arc::new(QuicPeer {
        client,
        client_serial,
        addr: SocketAddr::new(peer_ip, peer.port()),
        credentials,
    });
    loop {
        let (send, recv) = tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok(stream) => stream,
                Err(_) => break,
            },
            () = from.credentials.withdrawn.cancelled() => {
                tracing::warn!(workload = %ctx.workload, %peer, client = %from.client, "closing a QUIC tunnel: {}", relay::BY_TRUST);
                conn.close(quic::code::DONE, b"trust root withdrawn");
                break;
            }
        };
        tunnel.stream();
        let mut stream = quic::TunnelStream::new(send, recv);
        if !from.credentials.usable() {
            // The source replaces a connection whose stream fails before the answer.
            tracing::debug!(workload = %ctx.workload, %peer, client = %from.client, "a stream on a QUIC connection past its use; refusing it");
            let _ = stream.send.reset(quic::code::DONE);
            continue;
        }
        tracker.spawn(handle_quic_stream(stream, from.clone(), ctx.clone()));
    }
    drop(permit);
}

/// The verified source of a QUIC connection.
struct QuicPeer {
    client: SpiffeId,
    client_serial: String,
    addr: SocketAddr,
    credentials: Credentials,
}

/// One stream of a QUIC tunnel: its header, the checks, then the relay.
async fn handle_quic_stream(
    mut stream: quic::TunnelStream,
    from: Arc<QuicPeer>,
    ctx: Arc<PodContext>,
) {
    let ctx = &*ctx;
    let stats = &ctx.shared.stats;
    let peer = from.addr;
    let limits = &ctx.shared.limits;
    let _permit = match limits.open(&ctx.load, &ctx.workload, peer.ip(), false) {
        Ok(permit) => permit,
        Err(limit) => {
            stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
            let reason = format!("this node is at its {limit} limit");
            let answer = async {
                let _ =
                    header::write_stream(&mut stream.send, &response(Status::Overloaded, &reason))
                        .await;
                let _ = stream.send.finish();
                let _ = stream.send.stopped().await;
            };
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await;
            return;
        }
    };
    let header = header::read_stream::<TunnelRequest>(&mut stream.recv);
    let (request, early) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, header).await {
        Ok(Ok(got)) => got,
        failed => {
            let reason = match failed {
                Ok(Err(e)) => format!("no valid tunnel header: {e}"),
                _ => format!("no tunnel header within {HANDSHAKE_TIMEOUT:?}"),
            };
            stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(workload = %ctx.workload, %peer, client = %from.client, %reason, "QUIC tunnel refused");
            return stream.reset();
        }
    };
    stream.early = early;
    let dir = ctx.shared.directory();
    let trust = &from.credentials.withdrawn;
    let admitted = admit_tunnel(
        ctx,
        &dir,
        &request,
        &from.client,
        peer.ip(),
        Transport::Quic,
        trust,
    );
    match Box::pin(admitted).await {
        Ok((
            d,
            Admitted {
                upstream,
                guard,
                report,
            },
        )) => {
            let mut conn = opened(&ctx.shared.metrics, report);
            if let Err(e) = header::write_stream(&mut stream.send, &response(Status::Ok, "")).await
            {
                conn.fail(FailReason::Reset);
                tracing::warn!(workload = %ctx.workload, %peer, error = %e, "QUIC tunnel: the client went away");
                reset(upstream);
                return;
            }
            stats.tunnels_in.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                workload = %ctx.workload, client = %from.client, client_serial = %from.client_serial,
                source = %d.source, destination = %d.destination, id = d.connection_id,
                transport = %Transport::Quic, "tunnel accepted"
            );
            let stream = relay::Stream::Quic(Box::new(stream));
            let relayed = relay::relay(upstream, stream, Some(guard.closed()), &conn.traffic).await;
            if let Err(e) = relayed {
                stats.reset.fetch_add(1, Ordering::Relaxed);
                conn.fail(ended_by(&guard, Some(&from.credentials)));
                relay::log_failure(&ctx.workload, Some(peer), &e);
            }
        }
        Err(refusal) => {
            stats.tunnels_in_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                workload = %ctx.workload, %peer, client = %from.client, id = request.connection_id,
                status = ?refusal.status, reason = %refusal.reason, "tunnel refused"
            );
            let _ =
                header::write_stream(&mut stream.send, &response(refusal.status, &refusal.reason))
                    .await;
            let _ = stream.send.finish();
            let _ = stream.send.stopped().await;
        }
    }
}

/// One plaintext connection to the pod, handed over by the inbound program (PERMISSIVE mode).
/// Its local address is the destination the client asked for; all policy knows of the client
/// is its address.
pub async fn handle_plaintext(client: TcpStream, peer: SocketAddr, ctx: Arc<PodContext>) {
    let ctx = &*ctx;
    let stats = &ctx.shared.stats;
    stats.plaintext_in.fetch_add(1, Ordering::Relaxed);
    let limits = &ctx.shared.limits;
    // Plaintext comes from outside the mesh.
    let Ok(_permit) = limits.open(&ctx.load, &ctx.workload, peer.ip(), true) else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let destination = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(workload = %ctx.workload, %peer, error = %e, "plaintext connection without a local address; resetting it");
            reset(client);
            return;
        }
    };
    if let Err(r) = check_destination(ctx, &ctx.shared.directory(), destination) {
        tracing::warn!(workload = %ctx.workload, %peer, reason = %r.reason, "plaintext connection refused; resetting it");
        reset(client);
        return;
    }
    let request = authz::Request {
        destination: ctx.workload.clone(),
        destination_addr: destination,
        source_addr: peer,
        source_identity: None,
        connection_id: ctx.shared.connection_id(),
    };
    let id = request.connection_id;
    let dir = ctx.shared.directory();
    let pair = pair_at_destination(ctx, &dir, None, peer.ip(), destination.port());
    let details = Details {
        connection_id: id,
        source_address: Some(peer),
        destination_address: Some(destination),
        transport: Transport::Plaintext,
        ..Details::default()
    };
    let admitted = authorize_and_connect(ctx, request, None, pair.clone(), details.clone()).await;
    let Admitted {
        upstream,
        report,
        guard,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(r) => {
            r.report(ctx, &pair, details);
            if r.status == Status::Denied {
                // The deny itself is logged by the policy check.
                stats.plaintext_denied.fetch_add(1, Ordering::Relaxed);
            } else {
                tracing::info!(workload = %ctx.workload, %peer, reason = %r.reason, "plaintext: connect to the application failed; resetting the client");
            }
            reset(client);
            return;
        }
    };
    tracing::debug!(workload = %ctx.workload, %peer, %destination, id, "plaintext connection admitted");
    let upstream = relay::Stream::Plain(upstream);
    let mut conn = opened(&ctx.shared.metrics, report);
    // The relay holds the client here, not the application.
    let traffic = conn.traffic.swapped();
    if let Err(e) = relay::relay(client, upstream, Some(guard.closed()), &traffic).await {
        stats.reset.fetch_add(1, Ordering::Relaxed);
        conn.fail(ended_by(&guard, None));
        tracing::debug!(workload = %ctx.workload, error = %e, "plaintext relay ended with an error; both sides reset");
    }
}

/// Why no header came on a session, as far as the answer goes.
#[derive(Debug, PartialEq, Eq)]
enum NoHeader {
    /// The client ended the session in order (close_notify).
    Closed,
    /// An idle session's client went without close_notify: nothing to answer.
    Gone,
    /// A record failed authentication: never an orderly end, whatever the session's age.
    Tampered,
    /// Anything else the client sent wrong, answered with an alert where TLS has one.
    Invalid,
}

fn no_header(e: &HeaderError, first: bool) -> NoHeader {
    match e {
        HeaderError::Closed if !first => NoHeader::Closed,
        HeaderError::Session(s) if s.is_tampering() => NoHeader::Tampered,
        HeaderError::Session(s) if !first && s.alert().is_none() => NoHeader::Gone,
        _ => NoHeader::Invalid,
    }
}

/// Relays one connection; returns the session when it can carry another.
async fn relay_tunnel(
    ctx: &PodContext,
    peer: &SocketAddr,
    stream: Box<Session>,
    upstream: TcpStream,
    (guard, credentials): (&OpenGuard, &Credentials),
    conn: &mut Connection,
) -> Option<Box<Session>> {
    let stream = relay::Stream::Tunnel(stream);
    match relay::relay(upstream, stream, Some(guard.closed()), &conn.traffic).await {
        Ok(done) => done.session,
        Err(e) => {
            ctx.shared.stats.reset.fetch_add(1, Ordering::Relaxed);
            conn.fail(ended_by(guard, Some(credentials)));
            relay::log_failure(&ctx.workload, Some(*peer), &e);
            None
        }
    }
}

/// Why an admitted connection's relay failed: a policy change closed it, its tunnel's root
/// was withdrawn, or an error.
fn ended_by(guard: &OpenGuard, credentials: Option<&Credentials>) -> FailReason {
    if guard.closed().is_cancelled() {
        FailReason::ClosedByPolicy
    } else if credentials.is_some_and(|c| c.withdrawn.is_cancelled()) {
        FailReason::TrustWithdrawn
    } else {
        FailReason::Reset
    }
}

fn response(status: Status, reason: &str) -> TunnelResponse {
    TunnelResponse {
        status: status as i32,
        reason: reason.to_owned(),
    }
}

/// The delivery a tunnel header asks for, from `client`; a malformed field is a bad request
/// that names it.
pub fn parse(
    req: &TunnelRequest,
    client: SpiffeId,
    transport: Transport,
) -> Result<Delivery, Refusal> {
    let ip = |bytes: &[u8], what: &str| {
        mesh_api::ip_from_bytes(bytes).ok_or_else(|| {
            Refusal::new(
                Status::BadRequest,
                format!("{what} address has {} bytes", bytes.len()),
            )
        })
    };
    let port = |p: u32, what: &str| {
        u16::try_from(p).map_err(|_| {
            Refusal::new(
                Status::BadRequest,
                format!("{what} port {p} is out of range"),
            )
        })
    };
    Ok(Delivery {
        source_identity: client,
        source: SocketAddr::new(
            ip(&req.source_address, "source")?,
            port(req.source_port, "source")?,
        ),
        destination: SocketAddr::new(
            ip(&req.destination_address, "destination")?,
            port(req.destination_port, "destination")?,
        ),
        connection_id: req.connection_id,
        transport,
        tunnel_trust: None,
    })
}

/// The tunnel's own TCP source must be the workload the header names as the source.
fn check_tunnel_source(dir: &Directory, tcp_peer: IpAddr, d: &Delivery) -> Result<(), Refusal> {
    let from = dir.peer_by_addr(tcp_peer).map(|p| &p.key);
    let claimed = dir.peer_by_addr(d.source.ip()).map(|p| &p.key);
    if from.is_some() && from == claimed {
        Ok(())
    } else {
        Err(Refusal::new(
            Status::Denied,
            format!(
                "the tunnel comes from {tcp_peer} ({}) but names {} as its source",
                from.map_or_else(|| "not a mesh workload".to_owned(), ToString::to_string),
                d.source.ip()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> TunnelRequest {
        TunnelRequest {
            destination_address: vec![10, 0, 0, 2],
            destination_port: 8080,
            source_address: vec![10, 0, 0, 1],
            source_port: 40000,
            connection_id: 9,
        }
    }

    fn client() -> SpiffeId {
        "spiffe://cluster.local/ns/default/sa/a".parse().unwrap()
    }

    #[test]
    fn parses_a_well_formed_header() {
        let d = parse(&request(), client(), Transport::Tls).unwrap();
        assert_eq!(d.source, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(d.destination, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(d.connection_id, 9);
    }

    /// Regression (issue 19): a record that failed authentication on a reused session was
    /// taken for the client closing it; a client that closes in order is still quiet.
    #[test]
    fn a_forged_record_is_tampering_even_on_a_reused_session() {
        use crate::tunnel::{record::RecordError, session::SessionError};
        let forged = || HeaderError::Session(SessionError::Record(RecordError::Decrypt));
        for first in [true, false] {
            assert_eq!(no_header(&forged(), first), NoHeader::Tampered);
        }
        assert_eq!(no_header(&HeaderError::Closed, false), NoHeader::Closed);
        assert_eq!(no_header(&HeaderError::Closed, true), NoHeader::Invalid);
        let truncated = HeaderError::Session(SessionError::Truncated);
        assert_eq!(no_header(&truncated, false), NoHeader::Gone);
        let bad = HeaderError::Session(SessionError::BadPostHandshake);
        assert_eq!(no_header(&bad, false), NoHeader::Invalid);
    }

    #[test]
    fn malformed_headers_are_bad_requests_naming_the_field() {
        let mut short = request();
        short.source_address = vec![10, 0, 0];
        let mut big_port = request();
        big_port.destination_port = 70_000;
        for (req, field) in [(short, "source address"), (big_port, "destination port")] {
            let r = parse(&req, client(), Transport::Tls).unwrap_err();
            assert_eq!(r.status, Status::BadRequest);
            assert!(r.reason.contains(field), "{}", r.reason);
        }
    }
}
