//! Inbound: deliveries to a pod on this node, by how they arrive:
//!
//! - `tls.rs`: a tunnel from another node on the pod's :15008 listener (TLS with the pod's
//!   SVID, client certificate required), one connection after another per session;
//! - `quic.rs`: a QUIC connection on the pod's UDP :15008, one connection per stream;
//! - `plaintext.rs`: plaintext from outside the mesh on :15006, handed over by the inbound
//!   program (PERMISSIVE mode);
//! - from a pod on this node, the outbound side calls [`deliver`] directly, without TLS.
//!
//! Here is what they share: the destination's checks ([`deliver`]: addresses, identity,
//! then policy, then a connection to the application from inside the pod's netns), and for a
//! tunnel the one sequence after its header ([`serve_request`]): admitted or refused, answered,
//! relayed, each outcome counted and logged once.

mod plaintext;
mod quic;
mod tls;

pub use plaintext::handle as handle_plaintext;
pub use quic::serve as serve_quic;
pub use tls::handle;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};
use mesh_ebpf_common::PLAINTEXT_PORT;
use mesh_model::SpiffeId;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::labels::PairOf as _;
use super::{
    authz::{self, OpenGuard},
    directory::Directory,
    relay::{self, reset},
    PodContext,
};
use crate::metrics::{Connection, ConnectionMetrics, Details, FailReason, Outcome, Pair, Reporter};
use crate::transport::Transport;
use crate::tunnel::{anchors::Credentials, Session, TUNNEL_PORT};

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
    /// Refused because the control plane did not answer a lookup in time (on demand).
    unresolved: bool,
}

impl Refusal {
    fn new(status: Status, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            decided: None,
            unresolved: false,
        }
    }

    /// The source's workload is not known and the control plane did not say in time: the
    /// source is told to try later, as when this pod is at a limit.
    fn unresolved(reason: impl Into<String>) -> Self {
        Self {
            unresolved: true,
            ..Self::new(Status::Overloaded, reason)
        }
    }

    fn reason(&self) -> FailReason {
        match self.unresolved {
            true => FailReason::Unresolved,
            false => refusal_reason(self.status),
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

/// The bounded reason the metrics give for a refusal with `status`, at either end.
pub fn refusal_reason(status: Status) -> FailReason {
    match status {
        Status::Denied => FailReason::Denied,
        Status::UpstreamFailed => FailReason::UpstreamConnect,
        Status::Overloaded => FailReason::Overloaded,
        Status::RateLimited => FailReason::RateLimited,
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
    let from = Some(d.source.ip());
    let within = d.tunnel_trust.as_ref();
    authorize_and_connect(pod, request, within, from, pair, d.details()).await
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

/// The policy check every delivery ends with, then the connection to the application, which
/// sees it come `from` that address where it can (see [`PodContext::connect_to_app`]). The
/// connection's token (see [`OpenGuard`]) is a child of `within`, when given.
async fn authorize_and_connect(
    pod: &PodContext,
    request: authz::Request,
    within: Option<&CancellationToken>,
    from: Option<IpAddr>,
    pair: Pair,
    mut details: Details,
) -> Result<Admitted, Refusal> {
    // Registered before the check, which reads the newest policies: a change that lands after
    // the check finds the registration and re-checks it.
    let authz = &pod.shared.authz;
    let mut guard = authz.admit(request.clone(), within);
    let decision = authz.check(&pod.shared.directory(), &request);
    details.policy = decision.policy_name();
    details.rule = decision.rule_name();
    if !decision.allowed {
        let mut refusal = Refusal::new(Status::Denied, decision.to_string());
        refusal.decided = Some(Box::new((details.policy, details.rule)));
        return Err(refusal);
    }
    if let Some(refusal) = rate_limited(pod, &request) {
        return Err(refusal);
    }
    let destination = request.destination_addr;
    // Boxed: only the connect needs this much room, not the connection's life after it.
    let upstream = match from {
        Some(source) => Box::pin(pod.connect_to_app(destination, source)).await,
        None => Box::pin(pod.connect_in_pod(destination))
            .await
            .map(|s| (s, None)),
    };
    let (upstream, routing) = upstream.map_err(|e| {
        Refusal::new(
            Status::UpstreamFailed,
            format!("connect to {destination} failed: {e}"),
        )
    })?;
    guard.keep(routing);
    Ok(Admitted {
        upstream,
        guard,
        report: Box::new((pair, details)),
    })
}

/// The refusal of a connection over a rate limit on its destination port, if it is: each
/// Service that leads there counts with its most specific policy that takes the source; a
/// policy counts once, however many Services lead to it.
fn rate_limited(pod: &PodContext, request: &authz::Request) -> Option<Refusal> {
    let dir = pod.shared.directory();
    let limited = dir.rate_limits(&request.destination, request.destination_addr.port())?;
    authz::with_source(&dir, request, |src| {
        let mut limits: Vec<(&mesh_model::ObjectKey, mesh_model::traffic::RateLimit)> = Vec::new();
        for candidates in limited {
            let Some(policy) = candidates.iter().find(|p| p.takes_source(src)) else {
                continue;
            };
            if let Some(limit) = policy.rate_limit {
                if !limits.iter().any(|(k, _)| **k == policy.key) {
                    limits.push((&policy.key, limit));
                }
            }
        }
        let (key, limit) = pod
            .shared
            .traffic
            .rates
            .admit(&request.destination, &limits)
            .err()?;
        Some(Refusal::new(
            Status::RateLimited,
            format!(
                "over the rate limit of TrafficPolicy {key} ({} connections per {})",
                limit.connections,
                mesh_model::duration::format(limit.interval)
            ),
        ))
    })
}

/// The source of a tunnel, as its handshake proved it.
struct TunnelClient {
    id: SpiffeId,
    serial: String,
    /// The tunnel's own source address (TCP or UDP).
    addr: SocketAddr,
    /// What the tunnel may carry, and until when (see `tunnel/anchors.rs`).
    credentials: Credentials,
}

/// The end of a tunnel a header arrived on: where the destination's answer goes, and what
/// the relay drives once the connection is admitted.
trait TunnelEnd: Sized {
    const TRANSPORT: Transport;
    /// Sends the destination's answer to the header.
    fn answer(&mut self, response: &TunnelResponse) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends a refusal, then ends the end in order.
    fn refuse(self, response: &TunnelResponse) -> impl Future<Output = ()> + Send;
    fn into_stream(self) -> relay::Stream;
}

/// One tunnelled connection, from its header on: the checks, the answer, the relay. Returns
/// the session when it can carry another connection (a TLS session whose relay ended in
/// order).
async fn serve_request<E: TunnelEnd>(
    ctx: &PodContext,
    dir: &Directory,
    request: &TunnelRequest,
    client: &TunnelClient,
    mut end: E,
) -> Option<Box<Session>> {
    // Boxed: the connection's task keeps only the relay's state while it lives.
    let admitted = Box::pin(admit_tunnel(ctx, dir, request, client, E::TRANSPORT)).await;
    let (d, admitted) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            tunnel_refused(ctx);
            tracing::warn!(
                workload = %ctx.workload, peer = %client.addr, client = %client.id,
                id = request.connection_id, transport = E::TRANSPORT.as_str(), status = ?refusal.status,
                reason = %refusal.reason, "tunnel refused"
            );
            end.refuse(&response(refusal.status, &refusal.reason)).await;
            return None;
        }
    };
    let Admitted {
        upstream,
        guard,
        report,
    } = admitted;
    let mut conn = opened(&ctx.shared.metrics, report);
    if let Err(e) = end.answer(&response(Status::Ok, "")).await {
        conn.fail(FailReason::Reset);
        refused(
            ctx,
            client.addr,
            E::TRANSPORT,
            &format!("the client went away: {e}"),
        );
        reset(upstream);
        return None;
    }
    ctx.shared.tunnel_metrics.count(Outcome::InAccepted);
    tracing::info!(
        workload = %ctx.workload, client = %client.id, client_serial = %client.serial,
        source = %d.source, destination = %d.destination, id = d.connection_id,
        transport = E::TRANSPORT.as_str(), "tunnel accepted"
    );
    let closed = Some(guard.closed());
    match relay::relay(upstream, end.into_stream(), closed, &conn.traffic).await {
        Ok(done) => done.session,
        Err(e) => {
            conn.fail(ended_by(&guard, Some(&client.credentials)));
            relay::log_failure(&ctx.workload, Some(client.addr), &e);
            None
        }
    }
}

/// Counts a tunnel (or a QUIC connection) this pod's end refused, before or at a header.
fn tunnel_refused(ctx: &PodContext) {
    ctx.shared.tunnel_metrics.count(Outcome::InRefused);
}

/// Counts and logs a tunnel refused before any header could be checked.
fn refused(
    ctx: &PodContext,
    peer: SocketAddr,
    transport: Transport,
    reason: &dyn std::fmt::Display,
) {
    tunnel_refused(ctx);
    tracing::warn!(workload = %ctx.workload, %peer, transport = transport.as_str(), %reason, "tunnel refused");
}

/// The checks of one tunnelled connection: a well-formed header, sent from the address of
/// the workload it names as the source, then [`deliver`].
async fn admit_tunnel(
    ctx: &PodContext,
    dir: &Directory,
    request: &TunnelRequest,
    client: &TunnelClient,
    transport: Transport,
) -> Result<(Delivery, Admitted), Refusal> {
    let peer = client.addr.ip();
    // On demand, the tunnel's TCP source may be a workload this node was not sent: asked
    // for now, once the peer has proven a mesh identity (a stranger cannot make the node
    // ask). Only the TCP source: the source the header names must be that same workload
    // (`check_tunnel_source`), so a peer cannot make the node ask for addresses it chooses.
    let sources = |d: &Directory| -> Vec<crate::control::Lookup> {
        d.wanted_source(peer).into_iter().collect()
    };
    let resolved = match ctx.shared.lookups.is_some() {
        true => Some(ctx.shared.resolved(ctx.shared.directory(), sources).await),
        false => None,
    };
    let dir = resolved.as_deref().unwrap_or(dir);
    let checked = match sources(dir).as_slice() {
        [] => parse(request, client.id.clone(), transport).and_then(|mut d| {
            check_tunnel_source(dir, peer, &d)?;
            d.tunnel_trust = Some(client.credentials.withdrawn.clone());
            Ok(d)
        }),
        wanted => Err(Refusal::unresolved(format!(
            "the control plane did not say within {:?} whose address {wanted:?} is",
            super::LOOKUP_WAIT
        ))),
    };
    let d = match checked {
        Ok(d) => d,
        Err(r) => {
            let port = u16::try_from(request.destination_port).unwrap_or(0);
            let pair = pair_at_destination(ctx, dir, Some(&client.id), peer, port);
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
