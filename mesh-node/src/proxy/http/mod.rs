//! Service ports that declare HTTP (`appProtocol: http | h2c | grpc`): the source's node proxy
//! speaks HTTP with the application and picks a backend (by the route's weights) and an
//! endpoint (by the balancer) for each request, not once per connection. Requests go to the
//! chosen endpoint over upstream connections made as any connection to it is (`outbound::send`:
//! a tunnel, a QUIC stream or a same-node delivery), so identity, mTLS, the destination's
//! policy and the connection metrics are those of the L4 path underneath; the destination's
//! application sees ordinary HTTP.
//!
//! Upstream connections belong to the application's connection that made them (at most one
//! per endpoint for HTTP/2, a few for HTTP/1.1) and end with it: nothing outlives the client,
//! and nothing is shared between pods. `http` ports take HTTP/1.1 or HTTP/2 with prior
//! knowledge from the application and speak HTTP/1.1 to the endpoint; `h2c` and `grpc` ports
//! speak HTTP/2 both ways. Answers the proxy makes itself carry [`MESH_ERROR`].

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Body as _;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderValue},
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_model::{spec::RetryOn, traffic::Effective, AppProtocol};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

use super::{
    authz::OpenGuard,
    directory::{Backend, Directory, Route, Target},
    inbound,
    labels::PairOf as _,
    outbound::{self, SendError, Upstream},
    traffic::{expiry::Expiry, ServiceState, Slot},
    PodContext,
};
use crate::metrics::{
    Connection, Details, FailReason, Flow, Pair, Reporter, Request as RequestRecord,
};
use crate::tunnel::stream_io::{QuicIo, SessionIo};

pub mod headers;
mod inline;

/// The header on every answer the mesh made itself, saying why.
pub const MESH_ERROR: &str = "x-mycel-proxy-error";

/// An HTTP/1.1 client must send a request's headers within this once it started one.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Requests at once on one HTTP/2 connection from the application.
const MAX_STREAMS: u32 = 256;

/// HTTP/2 flow control, both ways: what a peer may send before the proxy passes it on, and
/// what the proxy buffers toward a peer that does not read. hyper's defaults (up to 2 MiB per
/// stream, 5 MiB per connection) times 256 streams and 32 upstream connections would let one
/// client that stops reading pin hundreds of MiB; these keep a connection to a few MiB and
/// still fill a fast link within a cluster.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_SEND_BUFFER: usize = 256 * 1024;
/// Header block size, as HTTP/1.1's buffer allows about the same.
const H2_HEADER_LIST: u32 = 64 * 1024;

/// How long a request's body may take to arrive when it is kept for another try and the
/// request has no `requestTimeout`.
const KEEP_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Upstream connections one client connection may have at once (an HTTP/2 client of an
/// `http` port needs one per request in flight).
const MAX_UPSTREAMS: usize = 32;

/// Longest wait before a retry (as `outbound.rs`'s).
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

/// How long requests in flight on an upstream connection past its `maxConnectionDuration` may
/// take before it is cut.
const MAX_DURATION_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Idle HTTP/1.1 connections kept per endpoint for one application connection (an HTTP/2
/// client may have several requests to one endpoint at once).
const IDLE_PER_ENDPOINT: usize = 4;

/// How long an upgrade may take to complete on both sides once the endpoint agreed.
const UPGRADE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a request waits for one of its client connection's upstream connections to end
/// when all [`MAX_UPSTREAMS`] are busy (idle ones are let go at once).
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves one application connection to an HTTP port until it ends.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    dst: SocketAddr,
    service: &str,
    protocol: AppProtocol,
) {
    let _ = client.set_nodelay(true);
    // The application's address as the destination sees it (the pod's, with its port): what
    // the access log names, as for a connection.
    let app = pod
        .shared
        .directory()
        .peer(&pod.workload)
        .and_then(|me| me.address_like(dst.ip()))
        .map_or(peer, |ip| SocketAddr::new(ip, peer.port()));
    let conn = Arc::new(Downstream {
        pod: pod.clone(),
        peer,
        app,
        dst,
        service: service.to_owned(),
        protocol,
        upstreams: Mutex::default(),
        live: Arc::default(),
        connecting: Mutex::default(),
        spliced: TaskTracker::new(),
        settings: Mutex::default(),
    });
    let downstream = conn.clone();
    let handler = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let io = TokioIo::new(client);
    let served = match protocol {
        // Mostly HTTP/1.1, which spawns nothing: measured, running it inside `inline`'s
        // driver cost it more than it saved.
        AppProtocol::Http => {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .max_send_buf_size(H2_SEND_BUFFER)
                .max_header_list_size(H2_HEADER_LIST);
            builder.serve_connection_with_upgrades(io, handler).await
        }
        AppProtocol::H2c | AppProtocol::Grpc => {
            // The connection's streams run in this task (see `inline`).
            let (exec, spawned) = inline::executor();
            let conn = hyper::server::conn::http2::Builder::new(exec)
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .max_send_buf_size(H2_SEND_BUFFER)
                .max_header_list_size(H2_HEADER_LIST)
                .serve_connection(io, handler);
            inline::drive(conn, spawned).await.map_err(Into::into)
        }
    };
    // An upgraded connection outlives hyper's: this one (and the pod's limit on outbound
    // connections, held by the caller) ends with it. The pooled connections do not wait.
    downstream
        .upstreams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    downstream.spliced.close();
    downstream.spliced.wait().await;
    if let Err(e) = served {
        let parse = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_parse() || h.is_parse_version_h2());
        if parse {
            let name = protocol.to_string();
            pod.shared.traffic.metrics.not_http(service, &name);
            tracing::warn!(
                workload = %pod.workload, %dst, %protocol, error = %e,
                "the application sent something that is not HTTP to a port declared {protocol}; closing its connection"
            );
        } else {
            tracing::debug!(workload = %pod.workload, %dst, error = %e, "HTTP connection ended");
        }
    }
}

/// One application connection to an HTTP port, and the upstream connections it made.
struct Downstream {
    pod: Arc<PodContext>,
    peer: SocketAddr,
    /// The application's address in the pod's network (`peer` is on loopback).
    app: SocketAddr,
    dst: SocketAddr,
    /// The Service the application asked for (by `dst`), as the metrics name it.
    service: String,
    protocol: AppProtocol,
    upstreams: Mutex<HashMap<SocketAddr, Senders>>,
    /// Upstream connections alive, pooled or not (at most [`MAX_UPSTREAMS`]).
    live: Arc<LiveCount>,
    /// HTTP/2 upstreams: one connect at a time per endpoint, so that a burst of requests
    /// shares the connection the first one makes.
    connecting: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    /// Upgraded connections being relayed.
    spliced: TaskTracker,
    /// Each backend's settings for this client, as resolved in one view of the mesh.
    settings: Mutex<Resolved>,
}

/// The settings of the backends a client's requests went to, in the view they were resolved
/// in: a request resolves them again only when the view changed. The view is held weakly, so
/// an idle connection does not keep an old view alive, and an address is never reused while a
/// weak reference holds it.
#[derive(Default)]
struct Resolved {
    view: std::sync::Weak<Directory>,
    /// By the backend's address in that view.
    backends: Vec<(usize, Arc<Effective>)>,
}

/// Upstream connections to one endpoint.
#[derive(Default)]
struct Senders {
    h1: Vec<Pooled<http1::SendRequest<Body>>>,
    h2: Option<Pooled<http2::SendRequest<Body>>>,
}

/// A connection to an endpoint, ready for a request.
enum Sender {
    H1(Pooled<http1::SendRequest<Body>>),
    H2(Pooled<http2::SendRequest<Body>>),
}

/// An upstream connection's handle, and when it stops taking new requests.
struct Pooled<S> {
    conn: S,
    /// Its `maxConnectionDuration` from when it was made: past it, the connection gets no new
    /// request and closes once those in flight are answered (or [`MAX_DURATION_DRAIN`] later).
    until: Option<Instant>,
}

impl<S> Pooled<S> {
    fn expired(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now >= until)
    }
}

impl Downstream {
    /// Answers one request, and reports it (metrics, access log) when its response ends, or
    /// when it ends without one (the client went away: this future is dropped).
    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Reported> {
        let ctx = &*self.pod;
        // One view of the mesh for the whole request: its report and its routing. On demand,
        // endpoints the Service gained since the connection was made are asked for first.
        let dst = self.dst;
        let dir = ctx
            .shared
            .resolved(ctx.shared.directory(), |d| d.wanted_for(dst))
            .await;
        let mut pair = dir
            .peer(&ctx.workload)
            .map(|me| Pair::default().with_source(me))
            .unwrap_or_default();
        pair.destination_service.clone_from(&self.service);
        let mut record = ctx.shared.request_metrics.start(pair, self.app, &req);
        let mut load = None;
        let response = self.forward(&dir, req, &mut record, &mut load).await;
        let why = response
            .headers()
            .get(MESH_ERROR)
            .and_then(|v| v.to_str().ok());
        record.answered(response.status().as_u16(), why);
        response.map(|body| Reported {
            body,
            _load: load,
            record: Some(record),
        })
    }

    /// A backend and an endpoint for one request, then the endpoint's answer, or the mesh's
    /// own when none could be had; `record` learns where it went. The endpoint that answered
    /// counts the request in its load (LeastConnections) until `load` drops, at the end of the
    /// response: a streaming response is load for as long as it streams.
    async fn forward(
        self: &Arc<Self>,
        dir: &Arc<Directory>,
        mut req: Request<Incoming>,
        record: &mut RequestRecord,
        load: &mut Option<Slot>,
    ) -> Response<Body> {
        let ctx = &*self.pod;
        let Route::Service(port) = dir.route(self.dst) else {
            return mesh_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the Service is no longer in the mesh",
            );
        };
        let Some(backend) = port.pick(self.dst.ip(), fastrand::u64(..)) else {
            return mesh_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no endpoint of {}", port.service),
            );
        };
        if let Some(route) = &port.route {
            ctx.shared
                .traffic
                .metrics
                .routed(route, &port.service, &backend.name);
            record.routed(&backend.name);
        }
        let settings = self.settings(dir, backend);
        let state = ctx.shared.traffic.service(backend);
        let od = &settings.outlier_detection.value;
        let targets = backend.targets(self.dst.ip());
        let endpoints = targets.len();
        let order = state.order(targets, settings.load_balancer.value, od, backend.turn());
        if order.is_empty() {
            return mesh_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no endpoint of {}", backend.name),
            );
        }
        headers::refuse_h2c_upgrade(&mut req);
        let connect_method = req.method() == hyper::Method::CONNECT;
        // A request that may have reached the endpoint goes again only if doing it twice is
        // the same as once (RFC 9110, 9.2.2); one that never left may go anywhere.
        let idempotent = matches!(
            *req.method(),
            hyper::Method::GET
                | hyper::Method::HEAD
                | hyper::Method::OPTIONS
                | hyper::Method::TRACE
                | hyper::Method::PUT
                | hyper::Method::DELETE
        );
        let upgrade = headers::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let http = &settings.http.value;
        let retries = &http.retries;
        let deadline = (!http.request_timeout.is_zero())
            .then(|| tokio::time::Instant::now() + http.request_timeout);
        let (parts, body) = match self.upstream_request(req, upgrade.is_some()) {
            Ok(request) => request.into_parts(),
            Err(unfit) => return mesh_error(StatusCode::BAD_REQUEST, &unfit.to_string()),
        };
        // A body is kept for another try only when one may happen and it is known to be small
        // enough; any other request is sent once, or tried again only if it was never sent.
        let size = body
            .size_hint()
            .upper()
            .filter(|n| *n <= u64::from(retries.max_body_bytes));
        // Room in the pod's share and the node's budget for kept bodies, held until the
        // request is answered.
        let room = match size {
            Some(n) if retries.attempts > 0 && upgrade.is_none() => {
                usize::try_from(n).ok().and_then(|n| {
                    let pod = &ctx.load.kept_body_bytes;
                    ctx.shared.traffic.kept_bodies.take(n, pod)
                })
            }
            _ => None,
        };
        let replay = room.is_some();
        let mut body = Some(body);
        let kept = if replay {
            let until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + KEEP_BODY_TIME);
            match body
                .take()
                .map(|b| tokio::time::timeout_at(until, b.collect()))
            {
                Some(collecting) => match collecting.await {
                    Ok(Ok(collected)) => Some(collected.to_bytes()),
                    Ok(Err(e)) => {
                        return mesh_error(
                            StatusCode::BAD_REQUEST,
                            &format!("the request's body ended early: {e}"),
                        )
                    }
                    Err(_) => {
                        return mesh_error(
                            StatusCode::REQUEST_TIMEOUT,
                            "the request's body did not arrive in time",
                        )
                    }
                },
                None => None,
            }
        } else {
            None
        };
        let budget = state.retry_budget();
        budget.requested();
        let metrics = &ctx.shared.traffic.metrics;
        let mut tries: u32 = 0;
        // Pooled connections that turned out closed before the request went: not tries.
        let mut stale = 0;
        loop {
            let candidate = &order[tries as usize % order.len()];
            let target = &candidate.target;
            let held_load = candidate.hold();
            record.tried(|pair| outbound::to_target(pair, target), target.addr);
            let request = match (&kept, body.take()) {
                (Some(bytes), _) => Request::from_parts(
                    headers::clone_parts(&parts),
                    Full::new(bytes.clone()).map_err(|e| match e {}).boxed(),
                ),
                (None, Some(b)) => Request::from_parts(headers::clone_parts(&parts), b),
                (None, None) => break,
            };
            let keep = upgrade.is_some();
            let attempt = self.attempt(
                (dir, &state, &settings),
                target,
                request,
                (deadline, endpoints, keep),
            );
            let failure = match Box::pin(attempt).await {
                Attempt::Answered(mut response, held) => {
                    let status = response.status();
                    let key = &target.peer.key;
                    if http.outlier_status_codes.contains(&status.as_u16()) {
                        state.failed(key, od, endpoints);
                    } else {
                        state.answered(key);
                    }
                    // gRPC's UNAVAILABLE says the call was not processed; a status code says
                    // nothing of that, so only an idempotent request goes again.
                    let retry_status = (idempotent
                        && retries.retry_on_status.contains(&status.as_u16()))
                        || (retries.retry_on.contains(&RetryOn::Unavailable)
                            && response
                                .headers()
                                .get("grpc-status")
                                .is_some_and(|v| v == "14"));
                    // hyper's HTTP/2 client tunnels a CONNECT on 200 only.
                    let h2_upstream = self.protocol != AppProtocol::Http;
                    let switched = status == StatusCode::SWITCHING_PROTOCOLS
                        || (connect_method
                            && if h2_upstream {
                                status == StatusCode::OK
                            } else {
                                status.is_success()
                            });
                    if switched {
                        // Only what the client asked for: a 101 it did not ask for would
                        // leave its connection in a state it does not know.
                        let (Some(client), Some(held)) = (upgrade, held) else {
                            return mesh_error(
                                StatusCode::BAD_GATEWAY,
                                &format!("{} switched protocols unasked", target.peer.key),
                            );
                        };
                        let server = hyper::upgrade::on(&mut response);
                        self.spliced.spawn(splice(client, server, held, held_load));
                        response.headers_mut().remove(MESH_ERROR);
                        return response.map(|b| b.boxed());
                    }
                    if let Some(held) = held {
                        self.spliced.spawn(held.carry_answer());
                    }
                    if !retry_status || kept.is_none() {
                        *load = Some(held_load);
                        return from_endpoint(response);
                    }
                    Failure::Status(response)
                }
                Attempt::NotSent(request, why) if stale < order.len() => {
                    stale += 1;
                    let (p, b) = (*request).into_parts();
                    if kept.is_none() {
                        body = Some(b);
                    }
                    drop(p);
                    tracing::debug!(workload = %ctx.workload, endpoint = %target.peer.key, %why, "a pooled HTTP connection was closing; the request goes on another");
                    continue;
                }
                Attempt::NotSent(request, why) | Attempt::Unreachable(why, request) => {
                    // Never sent: a body that was not kept can still go to another endpoint.
                    let (_, b) = (*request).into_parts();
                    if kept.is_none() {
                        body = Some(b);
                    }
                    Failure::Connect(why)
                }
                Attempt::Refused(why) => {
                    return mesh_error(StatusCode::SERVICE_UNAVAILABLE, &why);
                }
                Attempt::Reset(why) => Failure::Reset(why),
                Attempt::TimedOut if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                    metrics.http_timed_out(&backend.name);
                    return mesh_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "no response from {} within requestTimeout {}",
                            backend.name,
                            mesh_model::duration::format(http.request_timeout)
                        ),
                    );
                }
                Attempt::TimedOut => Failure::Reset(format!(
                    "no response within perTryTimeout {}",
                    mesh_model::duration::format(retries.per_try_timeout)
                )),
            };
            // A connect failure never reached the endpoint: it may go elsewhere even with a
            // body that was not kept (it was not sent).
            let wanted = match &failure {
                Failure::Connect(_) => retries.retry_on.contains(&RetryOn::ConnectFailure),
                Failure::Reset(_) => idempotent && retries.retry_on.contains(&RetryOn::Reset),
                Failure::Status(_) => true,
            };
            let replayable =
                kept.is_some() || (matches!(failure, Failure::Connect(_)) && body.is_some());
            let more = tries < retries.attempts;
            if wanted && replayable && more {
                if budget.retry(retries) {
                    tries += 1;
                    metrics.http_retry(&backend.name);
                    // connect.backoff, doubled for each try after the second, as at L4; never
                    // past the request's deadline.
                    let backoff = settings.connect.value.backoff;
                    let wait = backoff
                        .saturating_mul(1 << (tries - 1).min(16))
                        .min(MAX_BACKOFF);
                    if !wait.is_zero() {
                        let until = tokio::time::Instant::now() + wait;
                        tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
                    }
                    continue;
                }
                metrics.http_budget_exhausted(&backend.name);
                tracing::info!(service = %backend.name, "retry budget spent: the failure goes to the client");
            }
            return match failure {
                Failure::Status(response) => {
                    *load = Some(held_load);
                    from_endpoint(response)
                }
                Failure::Connect(why) => mesh_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "no endpoint of {} could be reached; the last: {why}",
                        backend.name
                    ),
                ),
                Failure::Reset(why) => mesh_error(StatusCode::BAD_GATEWAY, &why),
            };
        }
        mesh_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no endpoint of {} could be reached", backend.name),
        )
    }

    /// `backend`'s settings for requests of this client in the view `dir`.
    fn settings(&self, dir: &Arc<Directory>, backend: &Backend) -> Arc<Effective> {
        let mut resolved = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if !std::ptr::eq(resolved.view.as_ptr(), Arc::as_ptr(dir)) {
            *resolved = Resolved {
                view: Arc::downgrade(dir),
                backends: Vec::new(),
            };
        }
        let key = std::ptr::from_ref(backend).addr();
        if let Some((_, settings)) = resolved.backends.iter().find(|(b, _)| *b == key) {
            return settings.clone();
        }
        let me = dir.peer(&self.pod.workload).map(|p| &**p);
        let settings = Arc::new(backend.settings_for(me, self.dst.ip()));
        resolved.backends.push((key, settings.clone()));
        settings
    }

    /// One try of a request on `target`: a pooled or new connection, then the request, under
    /// the per-try timeout and the request's deadline.
    async fn attempt(
        &self,
        (dir, state, settings): (&Directory, &ServiceState, &Effective),
        target: &Target,
        request: Request<Body>,
        (deadline, endpoints, keep): (Option<tokio::time::Instant>, usize, bool),
    ) -> Attempt {
        let retries = &settings.http.value.retries;
        let per_try = (!retries.per_try_timeout.is_zero())
            .then(|| tokio::time::Instant::now() + retries.per_try_timeout);
        let until = match (deadline, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let work = async {
            // A burst of requests to one HTTP/2 endpoint waits for the first one's connect and
            // shares its connection; the turn is held until this request has a connection.
            let h2 = self.protocol != AppProtocol::Http && !keep;
            let gate = h2.then(|| self.connect_gate(target.addr));
            let turn = match &gate {
                Some(gate) => Some(gate.lock().await),
                None => None,
            };
            // An upgrade takes a connection of its own, which becomes the byte stream.
            let pooled = if keep { None } else { self.pooled(target.addr) };
            let (sender, held) = match pooled {
                Some(s) => (s, None),
                None => {
                    // A new upstream connection counts against the per-node limits, as an
                    // L4 connection does, for as long as it lives.
                    // The client's own cap is this client's doing: not the endpoint's failure,
                    // and not tried elsewhere.
                    let Some(live) = self.room().await else {
                        return Attempt::Refused(format!(
                            "this client connection has {MAX_UPSTREAMS} upstream connections busy"
                        ));
                    };
                    let limits = &settings.connection_limits.value;
                    let Ok((open, pending)) = state.admit(limits) else {
                        return Attempt::Refused(
                            "at the connection limit to the Service from this node (connectionLimits)".to_owned(),
                        );
                    };
                    let started = Instant::now();
                    // Boxed: a connect is rare next to the requests that reuse it, and its
                    // state would otherwise weigh on every request's future.
                    let made =
                        Box::pin(self.connect(dir, target, settings, (open, live), keep)).await;
                    drop(pending);
                    match made {
                        Ok((sender, held)) => {
                            state.succeeded(&target.peer.key, started.elapsed());
                            // In the pool at once, for the requests waiting on the turn.
                            if let Sender::H2(s) = &sender {
                                let shared = Pooled {
                                    conn: s.conn.clone(),
                                    until: s.until,
                                };
                                self.keep(target.addr, Sender::H2(shared));
                            }
                            (sender, held)
                        }
                        Err(e) => {
                            tracing::info!(
                                workload = %self.pod.workload, endpoint = %target.peer.key,
                                addr = %target.addr, error = %e,
                                "HTTP endpoint could not be reached"
                            );
                            if e.endpoint_failed() {
                                let od = &settings.outlier_detection.value;
                                state.failed(&target.peer.key, od, endpoints);
                            }
                            // Not sent: the request goes back for another endpoint.
                            return if e.try_next() {
                                Attempt::Unreachable(e.to_string(), Box::new(request))
                            } else {
                                Attempt::Refused(e.for_client())
                            };
                        }
                    }
                }
            };
            // Not while the request is answered: requests share the connection.
            drop(turn);
            match self.send(target.addr, sender, request, !keep).await {
                Ok(response) => Attempt::Answered(response, held),
                Err(Failed::NotSent(request, why)) => Attempt::NotSent(request, why),
                Err(Failed::Sent(why)) => {
                    Attempt::Reset(format!("{} failed the request: {why}", target.peer.key))
                }
            }
        };
        match until {
            Some(until) => tokio::time::timeout_at(until, work)
                .await
                .unwrap_or(Attempt::TimedOut),
            None => work.await,
        }
    }

    /// The request as the endpoint's protocol wants it.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        upgrade: bool,
    ) -> Result<Request<Body>, headers::Unfit> {
        let (mut parts, body) = req.into_parts();
        headers::to_upstream(&mut parts, upgrade, self.protocol != AppProtocol::Http)?;
        Ok(Request::from_parts(parts, body.boxed()))
    }

    /// The connect turn of the HTTP/2 endpoint at `addr`.
    fn connect_gate(&self, addr: SocketAddr) -> Arc<tokio::sync::Mutex<()>> {
        let mut all = self.connecting.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(addr).or_default().clone()
    }

    /// Room for one more upstream connection: at once if there is; else the idle ones are
    /// let go (a client that went through many endpoints keeps connections to each) and the
    /// request waits, at most [`ROOM_WAIT`], for one to end.
    async fn room(&self) -> Option<Live> {
        if let Some(live) = Live::reserve(&self.live) {
            return Some(live);
        }
        self.upstreams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let give_up = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let freed = self.live.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(live) = Live::reserve(&self.live) {
                return Some(live);
            }
            tokio::time::timeout_at(give_up, freed).await.ok()?;
        }
    }

    /// A pooled connection to `addr` that can take a request now. Connections past their
    /// `maxConnectionDuration` leave the pool (every endpoint's, so that one no request goes
    /// to any more is let go too); dropping the handle lets the connection close once what
    /// is in flight on it is answered.
    fn pooled(&self, addr: SocketAddr) -> Option<Sender> {
        let now = Instant::now();
        let mut all = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, senders| {
            if senders
                .h2
                .as_ref()
                .is_some_and(|h2| h2.conn.is_closed() || h2.expired(now))
            {
                senders.h2 = None;
            }
            // One still reading its last response is busy, not gone: it stays.
            senders
                .h1
                .retain(|h1| !h1.conn.is_closed() && !h1.expired(now));
            senders.h2.is_some() || !senders.h1.is_empty()
        });
        let senders = all.get_mut(&addr)?;
        let found = if let Some(h2) = senders.h2.as_ref().filter(|h2| h2.conn.is_ready()) {
            Some(Sender::H2(Pooled {
                conn: h2.conn.clone(),
                until: h2.until,
            }))
        } else {
            let ready = senders.h1.iter().position(|h1| h1.conn.is_ready());
            ready.map(|i| Sender::H1(senders.h1.swap_remove(i)))
        };
        if senders.h2.is_none() && senders.h1.is_empty() {
            all.remove(&addr);
        }
        found
    }

    /// Keeps `sender` for the next request to `addr`, unless it is closed or expired.
    fn keep(&self, addr: SocketAddr, sender: Sender) {
        let now = Instant::now();
        let mut all = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        let senders = all.entry(addr).or_default();
        match sender {
            Sender::H1(s)
                if senders.h1.len() < IDLE_PER_ENDPOINT
                    && !s.conn.is_closed()
                    && !s.expired(now) =>
            {
                senders.h1.push(s)
            }
            Sender::H2(s) if !s.conn.is_closed() && !s.expired(now) => senders.h2 = Some(s),
            _ => {}
        }
        if senders.h2.is_none() && senders.h1.is_empty() {
            all.remove(&addr);
        }
    }

    /// Sends `request` on `sender`; the connection goes back to the pool once the response's
    /// headers are in (HTTP/1.1: once its body is read, which hyper waits for by itself).
    async fn send(
        &self,
        addr: SocketAddr,
        sender: Sender,
        request: Request<Body>,
        pool: bool,
    ) -> Result<Response<Incoming>, Failed> {
        match sender {
            Sender::H1(mut s) => {
                let sent = s.conn.try_send_request(request).await;
                let response = sent.map_err(|mut e| match e.take_message() {
                    Some(request) => Failed::NotSent(Box::new(request), e.into_error().to_string()),
                    None => Failed::Sent(e.into_error().to_string()),
                })?;
                if pool {
                    self.keep(addr, Sender::H1(s));
                }
                Ok(response)
            }
            Sender::H2(mut s) => {
                let sent = s.conn.try_send_request(request).await;
                if pool {
                    self.keep(addr, Sender::H2(s));
                }
                sent.map_err(|mut e| match e.take_message() {
                    Some(request) => Failed::NotSent(Box::new(request), e.into_error().to_string()),
                    None => Failed::Sent(e.into_error().to_string()),
                })
            }
        }
    }

    /// A new upstream connection to `target`, as the L4 path makes one, and the HTTP
    /// handshake on it. What it holds (its report, its slot of the limits, a same-node
    /// delivery's guard) lives in its driver task, or, for an upgrade (`keep`), is handed back
    /// for the byte stream that follows. The driver ends, closing the connection, when the
    /// endpoint or the client ends it, a policy change denies a same-node delivery, the
    /// root of the tunnel's peer is withdrawn, or it expires: `idleTimeout` without a byte,
    /// or `maxConnectionDuration` (after which it takes no new request, and is cut
    /// [`MAX_DURATION_DRAIN`] later if those in flight have not ended it; an upgraded
    /// connection is cut at once, as an L4 one).
    async fn connect(
        &self,
        dir: &Directory,
        target: &Target,
        settings: &Effective,
        (open, live): (Slot, Live),
        keep: bool,
    ) -> Result<(Sender, Option<Box<Held>>), SendError> {
        let ctx = &*self.pod;
        let deadline = tokio::time::Instant::now() + settings.connect.value.timeout;
        let id = ctx.shared.connection_id();
        let send = outbound::send(ctx, dir, target, self.peer, id, deadline);
        let upstream = tokio::time::timeout_at(deadline, Box::pin(send))
            .await
            .unwrap_or(Err(SendError::Timeout { addr: target.addr }))?;
        let me = dir.peer(&ctx.workload);
        let mut pair = me
            .map(|me| Pair::default().with_source(me))
            .unwrap_or_default();
        outbound::to_target(&mut pair, target);
        pair.destination_service.clone_from(&self.service);
        let (transport, _) = upstream.transport();
        let details = Details {
            connection_id: id,
            transport,
            destination_address: Some(target.addr),
            ..Details::default()
        };
        let metrics = &ctx.shared.metrics;
        let conn = metrics.opened(Reporter::Source, &pair, details);
        let (io, local, withdrawn) = match upstream {
            Upstream::Tunnel { session, .. } => {
                let withdrawn = session.withdrawn().cloned();
                (
                    Box::new(SessionIo::new(session)) as Box<dyn Stream>,
                    None,
                    withdrawn,
                )
            }
            Upstream::Quic { stream, .. } => {
                let withdrawn = stream.withdrawn.clone();
                (
                    Box::new(QuicIo::new(stream)) as Box<dyn Stream>,
                    None,
                    withdrawn,
                )
            }
            Upstream::Local(tcp, guard, admitted) => (
                Box::new(tcp) as Box<dyn Stream>,
                Some((inbound::opened(metrics, admitted), guard)),
                None,
            ),
            Upstream::Plain(tcp) => (Box::new(tcp) as Box<dyn Stream>, None, None),
        };
        // A delivery on this node is also its destination's connection: both count its bytes.
        let traffic = match &local {
            Some((report, _)) => conn.traffic.clone().and(&report.traffic.swapped()),
            None => conn.traffic.clone(),
        };
        let (severed, io_gone) = (CancellationToken::new(), CancellationToken::new());
        let counted = Counted {
            io,
            sent: traffic.from_app,
            received: traffic.to_app,
            cut: Box::pin(severed.clone().cancelled_owned()),
            _gone: io_gone.clone().drop_guard(),
        };
        let io = TokioIo::new(counted);
        let handshake_failed = |e: hyper::Error| SendError::Http {
            addr: target.addr,
            detail: e.to_string(),
        };
        type Driver = Pin<Box<dyn std::future::Future<Output = Result<(), hyper::Error>> + Send>>;
        let max = settings.max_connection_duration.value;
        let until = (!max.is_zero()).then(|| Instant::now() + max);
        let (sender, driver): (Sender, Driver) = if self.protocol == AppProtocol::Http {
            let (s, c) = http1::handshake(io).await.map_err(handshake_failed)?;
            let s = Pooled { conn: s, until };
            (Sender::H1(s), Box::pin(c.with_upgrades()))
        } else {
            // hyper's own tasks here, not `inline`'s: run inline, the connection's I/O would
            // end with `driver` below, cutting a CONNECT's last bytes when its splice ends,
            // and holding the connection's limits until its last response body ends.
            let (s, c) = http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .max_send_buf_size(H2_SEND_BUFFER)
                .max_header_list_size(H2_HEADER_LIST)
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            (Sender::H2(Pooled { conn: s, until }), Box::pin(c))
        };
        let cut = if max.is_zero() || keep {
            max
        } else {
            max + MAX_DURATION_DRAIN
        };
        let idle = settings.idle_timeout.value;
        let expiry = Expiry::start(idle, cut, conn.totals(), withdrawn.as_ref());
        let held = Held {
            conn,
            open: Some((open, live)),
            severed: severed.clone(),
            local,
            withdrawn,
            expiry,
            upgrade: None,
        };
        if keep {
            // The connection is the client's once the endpoint switches protocols; until
            // then (and if it answers otherwise) it is cut when what holds it goes.
            let (cut, done) = (CancellationToken::new(), CancellationToken::new());
            let driven = (cut.clone(), done.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = driver => {}
                    () = driven.0.cancelled() => {}
                }
                driven.1.cancel();
            });
            let mut held = Box::new(held);
            held.upgrade = Some((cut.drop_guard(), done));
            return Ok((sender, Some(held)));
        }
        tokio::spawn(async move {
            let mut held = held;
            let closed = held.closed();
            tokio::pin!(closed);
            let reason = tokio::select! {
                ended = driver => match ended {
                    Err(_) => Some(FailReason::Reset),
                    // The request side let go of it (its client went, or it was retired
                    // from the pool). An HTTP/2 connection's I/O may still carry answers,
                    // in hyper's task: they finish, and are cut as any would be until then.
                    Ok(()) => {
                        held.open = None;
                        tokio::select! {
                            () = io_gone.cancelled() => None,
                            reason = &mut closed => Some(reason),
                        }
                    }
                },
                reason = &mut closed => Some(reason),
            };
            if let Some(reason) = reason {
                held.cut(reason);
            }
        });
        Ok((sender, None))
    }
}

/// What an upstream connection holds while it lives.
struct Held {
    conn: Box<Connection>,
    /// Its slot of the Service's connection limits, and of its client's upstream
    /// connections: let go when the request side is (the I/O may carry HTTP/2 streams on).
    open: Option<(Slot, Live)>,
    /// Fails the connection's I/O (see `Counted`).
    severed: CancellationToken,
    /// A same-node delivery: its destination's report, and the guard a policy change fires.
    local: Option<(Box<Connection>, OpenGuard)>,
    /// Fires when the root of the tunnel's peer is withdrawn.
    withdrawn: Option<CancellationToken>,
    /// `idleTimeout` and `maxConnectionDuration`, when either is set (made under
    /// `withdrawn`).
    expiry: Option<Expiry>,
    /// A connection made for an upgrade: its driver, cut when this drops, and the token
    /// its end fires.
    upgrade: Option<(tokio_util::sync::DropGuard, CancellationToken)>,
}

impl Held {
    /// A connection made for an upgrade that the endpoint answered with an ordinary
    /// response: it carries that response, and is held, counted and watched as any upstream
    /// connection until it ends.
    async fn carry_answer(mut self: Box<Self>) {
        let Some((_, done)) = &self.upgrade else {
            return;
        };
        let done = done.clone();
        let closed = self.closed();
        tokio::select! {
            reason = closed => self.cut(reason),
            () = done.cancelled() => {}
        }
    }

    /// Closes the connection for `reason`, with whatever is still on it.
    fn cut(&mut self, reason: FailReason) {
        self.severed.cancel();
        self.conn.fail(reason);
    }

    /// Resolves, with the reason, when the connection must close though both ends want it.
    fn closed(&self) -> impl std::future::Future<Output = FailReason> + Send + 'static {
        let guard = self.local.as_ref().map(|(_, g)| g.closed().clone());
        let withdrawn = self.withdrawn.clone();
        // The expiry's token also fires with `withdrawn`, and then says no reason of its own.
        let expired = self.expiry.as_ref().map(Expiry::fired);
        async move {
            tokio::select! {
                () = async { match &guard { Some(g) => g.cancelled().await, None => std::future::pending().await } } => FailReason::ClosedByPolicy,
                () = async { match &withdrawn { Some(w) => w.cancelled().await, None => std::future::pending().await } } => FailReason::TrustWithdrawn,
                reason = async { match expired { Some(e) => e.await, None => std::future::pending().await } } => reason.unwrap_or(FailReason::TrustWithdrawn),
            }
        }
    }
}

/// The upstream connections of one client connection alive (or being made), and a wake-up
/// when one ends.
#[derive(Default)]
struct LiveCount {
    n: AtomicUsize,
    freed: tokio::sync::Notify,
}

/// Counts an upstream connection of one client connection while it lives (or is being made).
struct Live(Arc<LiveCount>);

impl Live {
    /// One of [`MAX_UPSTREAMS`], taken before the connect so that requests at once cannot
    /// all pass the check.
    fn reserve(live: &Arc<LiveCount>) -> Option<Self> {
        live.n
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_UPSTREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(live.clone()))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_waiters();
    }
}

/// How one try of a request went.
enum Attempt {
    /// With what its connection holds when it was made for an upgrade.
    Answered(Response<Incoming>, Option<Box<Held>>),
    /// A pooled connection could not take it: it was not sent.
    NotSent(Box<Request<Body>>, String),
    /// No connection to the endpoint could be made: the request never reached it, and comes
    /// back for another.
    Unreachable(String, Box<Request<Body>>),
    /// Not to be tried elsewhere: a deny, a limit (the request was not sent).
    Refused(String),
    /// The endpoint's connection failed after the request went, before the response's
    /// headers.
    Reset(String),
    TimedOut,
}

/// A try that failed, for the decision to try again.
enum Failure {
    Connect(String),
    Reset(String),
    /// The endpoint's own answer, a status the policy retries.
    Status(Response<Incoming>),
}

/// Why a request did not get the endpoint's answer.
enum Failed {
    /// The connection could not take it; it was not sent and may go elsewhere.
    NotSent(Box<Request<Body>>, String),
    /// It was sent (or partly), so it is not tried again.
    Sent(String),
}

/// Copies between the client's and the endpoint's upgraded connections until both end, or
/// until the upstream connection must close (a policy change, a withdrawn root); it is
/// reported, and counts against the limits, until then.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    mut held: Box<Held>,
    _load: Slot,
) {
    let closed = held.closed();
    tokio::pin!(closed);
    // The switch completes once both sides' messages are done; a policy change, a withdrawn
    // root or expiry applies while it waits too, and so does a bound.
    let switched = tokio::time::timeout(UPGRADE_WAIT, async { tokio::join!(client, server) });
    let (client, server) = tokio::select! {
        done = switched => match done {
            Ok((Ok(client), Ok(server))) => (client, server),
            _ => {
                held.cut(FailReason::Reset);
                return;
            }
        },
        reason = &mut closed => {
            held.cut(reason);
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut server = TokioIo::new(server);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if copied.is_err() {
                held.cut(FailReason::Reset);
            }
        }
        reason = &mut closed => held.cut(reason),
    }
}

/// An endpoint's answer as the client gets it (see [`headers::from_endpoint`]).
fn from_endpoint(response: Response<Incoming>) -> Response<Body> {
    let mut response = response.map(|b| b.boxed());
    headers::from_endpoint(response.headers_mut());
    response
}

/// An answer the mesh makes itself.
fn mesh_error(status: StatusCode, why: &str) -> Response<Body> {
    let text = format!("{why}\n");
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    // Header values are visible ASCII: anything else in the reason becomes a space.
    let value: String = why
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .take(512)
        .collect();
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(MESH_ERROR, v);
    }
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// The byte stream an upstream connection runs on: a tunnel session, a QUIC stream or, on
/// this node, the TCP connection to the pod.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// An upstream connection's bytes, counted into its connection metrics as the relay counts
/// them: what the application sent, what it received.
struct Counted {
    io: Box<dyn Stream>,
    sent: Flow,
    received: Flow,
    /// Fires when the connection is cut (a policy change, a withdrawn root, an expiry): the
    /// connection's I/O fails from then on, and whoever waits on it is woken. hyper runs an
    /// HTTP/2 connection's I/O in a task of its own, which dropping the driver does not end.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Fires when the I/O is dropped: the connection is gone.
    _gone: tokio_util::sync::DropGuard,
}

impl Counted {
    /// An error once the connection was cut; else `polled`, with this task also woken by a
    /// cut when it is to wait.
    fn unless_cut<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: impl FnOnce(&mut Self, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if std::future::Future::poll(self.cut.as_mut(), cx).is_ready() {
            let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "the connection was cut");
            return Poll::Ready(Err(cut));
        }
        polled(self, cx)
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().unless_cut(cx, |this, cx| {
            let before = buf.filled().len();
            let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
            this.received.add(buf.filled().len() - before);
            polled
        })
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().unless_cut(cx, |this, cx| {
            let polled = Pin::new(&mut *this.io).poll_write(cx, data);
            if let Poll::Ready(Ok(n)) = &polled {
                this.sent.add(*n);
            }
            polled
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .unless_cut(cx, |this, cx| Pin::new(&mut *this.io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response's body on its way to the client, reporting to the request's record as it goes;
/// the record is closed (counted, observed, logged) when the body ends or is dropped.
pub struct Reported {
    body: Body,
    /// The endpoint's load slot, until the response ends.
    _load: Option<Slot>,
    record: Option<RequestRecord>,
}

impl hyper::body::Body for Reported {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(record)) = (frame.data_ref(), &mut this.record) {
                    record.body(data.len());
                }
                // hyper may not ask again once the body says it has ended.
                if this.body.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Reported {
    fn finish(&mut self, complete: bool) {
        if let Some(mut record) = self.record.take() {
            if complete {
                record.complete();
            }
        }
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        // An empty body is never polled: it ended as it began.
        let ended = self.body.is_end_stream();
        self.finish(ended);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use prometheus::Registry;

    use super::*;
    use crate::{access_log::AccessLog, metrics::RequestMetrics};

    /// A response's body holds its request's record and its endpoint's load slot: the request
    /// is counted when the body ends, and the endpoint is no longer loaded once the body is
    /// gone, not when the headers went out.
    #[tokio::test]
    async fn a_response_body_holds_the_record_and_the_load_until_it_ends() {
        let registry = Registry::new();
        let metrics =
            RequestMetrics::register(&registry, Arc::new(AccessLog::off()), false).unwrap();
        let counted = || -> u64 {
            let all = crate::metrics::samples(&registry, "mycel_http_requests_total", &[]);
            all.iter().sum::<f64>() as u64
        };
        let load = Arc::new(AtomicU32::new(0));
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let get = Request::get("/").body(()).unwrap();
        let mut record = metrics.start(Pair::default(), client, &get);
        record.answered(200, None);
        let mut body = Reported {
            body: Full::new(Bytes::from_static(b"hello"))
                .map_err(|e| match e {})
                .boxed(),
            _load: Slot::take(&load, None),
            record: Some(record),
        };
        assert_eq!((counted(), load.load(Ordering::Relaxed)), (0, 1));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().map(Bytes::len), Some(5));
        assert_eq!(counted(), 1, "counted when the body ended");
        assert_eq!(
            load.load(Ordering::Relaxed),
            1,
            "still loaded until it is gone"
        );
        drop(body);
        assert_eq!((counted(), load.load(Ordering::Relaxed)), (1, 0));
    }
}
