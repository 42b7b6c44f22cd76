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
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderValue},
    Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_model::{authz::Source, AppProtocol};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{
    directory::{Route, Target},
    inbound,
    labels::PairOf as _,
    outbound::{self, SendError, Upstream},
    traffic::Slot,
    PodContext,
};
use crate::metrics::{Details, Flow, Pair, Reporter};
use crate::tunnel::stream_io::SessionIo;

/// The header on every answer the mesh made itself, saying why.
pub const MESH_ERROR: &str = "x-mycel-proxy-error";

/// An HTTP/1.1 client must send a request's headers within this once it started one.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Requests at once on one HTTP/2 connection from the application.
const MAX_STREAMS: u32 = 256;

/// Idle HTTP/1.1 connections kept per endpoint for one application connection (an HTTP/2
/// client may have several requests to one endpoint at once).
const IDLE_PER_ENDPOINT: usize = 4;

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
    let conn = Arc::new(Downstream {
        pod: pod.clone(),
        peer,
        dst,
        protocol,
        upstreams: Mutex::default(),
    });
    let handler = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.forward(req).await) }
    });
    let io = TokioIo::new(client);
    let served = match protocol {
        AppProtocol::Http => {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS);
            builder.serve_connection_with_upgrades(io, handler).await
        }
        AppProtocol::H2c | AppProtocol::Grpc => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .serve_connection(io, handler)
                .await
                .map_err(Into::into)
        }
    };
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
    dst: SocketAddr,
    protocol: AppProtocol,
    upstreams: Mutex<HashMap<SocketAddr, Senders>>,
}

/// Upstream connections to one endpoint.
#[derive(Default)]
struct Senders {
    h1: Vec<http1::SendRequest<Body>>,
    h2: Option<http2::SendRequest<Body>>,
}

/// A connection to an endpoint, ready for a request.
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Downstream {
    /// Answers one request: a backend and an endpoint for it, then the endpoint's answer, or
    /// the mesh's own when none could be had.
    async fn forward(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let ctx = &*self.pod;
        let dir = ctx.shared.directory();
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
        }
        let me = dir.peer(&ctx.workload);
        let unknown = if self.dst.is_ipv4() {
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        };
        let settings = backend.settings(&Source {
            address: me
                .and_then(|me| me.address_like(self.dst.ip()))
                .unwrap_or(unknown),
            workload: me.map(|me| me.as_source()),
        });
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
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let mut req = Some(self.upstream_request(req));
        let connect = settings.connect.value;
        let mut last = String::new();
        for attempt in 0..connect.max_attempts.max(1) {
            let candidate = &order[attempt as usize % order.len()];
            let target = &candidate.target;
            let _load = candidate.hold();
            let sender = match self.pooled(target.addr) {
                Some(s) => s,
                None => {
                    // A new upstream connection counts against the per-node limits, as an
                    // L4 connection does, for as long as it lives.
                    let limits = &settings.connection_limits.value;
                    let Ok((open, pending)) = state.admit(limits) else {
                        return mesh_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!(
                                "at the connection limit to {} from this node (connectionLimits)",
                                backend.name
                            ),
                        );
                    };
                    let started = Instant::now();
                    let made = self.connect(&dir, target, connect.timeout, open).await;
                    drop(pending);
                    match made {
                        Ok(s) => {
                            state.succeeded(&target.peer.key, started.elapsed());
                            s
                        }
                        Err(e) => {
                            tracing::info!(
                                workload = %ctx.workload, service = %backend.name, endpoint = %target.peer.key,
                                addr = %target.addr, attempt = attempt + 1, error = %e,
                                "HTTP endpoint could not be reached"
                            );
                            if e.endpoint_failed() {
                                state.failed(&target.peer.key, od, endpoints);
                            }
                            if !e.try_next() {
                                return mesh_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
                            }
                            last = e.to_string();
                            continue;
                        }
                    }
                }
            };
            let Some(request) = req.take() else { break };
            match self.send(target.addr, sender, request).await {
                Ok(mut response) => {
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(client) = upgrade {
                            let server = hyper::upgrade::on(&mut response);
                            tokio::spawn(splice(client, server));
                        }
                    }
                    return response.map(|b| b.boxed());
                }
                // Not sent (the connection was closing): another try may send it.
                Err(Failed::NotSent(request, e)) => {
                    last = e;
                    req = Some(*request);
                }
                Err(Failed::Sent(e)) => {
                    return mesh_error(
                        StatusCode::BAD_GATEWAY,
                        &format!("{} failed the request: {e}", target.peer.key),
                    )
                }
            }
        }
        mesh_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "no endpoint of {} could be reached; the last: {last}",
                backend.name
            ),
        )
    }

    /// The request as the endpoint's protocol wants it.
    fn upstream_request(&self, req: Request<Incoming>) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        let h2_upstream = self.protocol != AppProtocol::Http;
        if !h2_upstream {
            // An HTTP/2 client's authority is the HTTP/1.1 Host header.
            if !parts.headers.contains_key(header::HOST) {
                if let Some(host) = parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                {
                    parts.headers.insert(header::HOST, host);
                }
            }
            if parts.version == Version::HTTP_2 {
                parts.version = Version::HTTP_11;
                if let Some(path) = parts.uri.path_and_query().cloned() {
                    parts.uri = path.as_str().parse().unwrap_or_default();
                }
            }
        }
        Request::from_parts(parts, body.boxed())
    }

    /// A pooled connection to `addr` that can take a request now.
    fn pooled(&self, addr: SocketAddr) -> Option<Sender> {
        let mut all = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        let senders = all.get_mut(&addr)?;
        if let Some(h2) = &senders.h2 {
            if h2.is_ready() {
                return Some(Sender::H2(h2.clone()));
            }
            senders.h2 = None;
        }
        while let Some(h1) = senders.h1.pop() {
            if h1.is_ready() {
                return Some(Sender::H1(h1));
            }
        }
        None
    }

    /// Keeps `sender` for the next request to `addr`.
    fn keep(&self, addr: SocketAddr, sender: Sender) {
        let mut all = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        let senders = all.entry(addr).or_default();
        match sender {
            Sender::H1(s) if senders.h1.len() < IDLE_PER_ENDPOINT && !s.is_closed() => {
                senders.h1.push(s)
            }
            Sender::H2(s) if !s.is_closed() => senders.h2 = Some(s),
            _ => {}
        }
    }

    /// Sends `request` on `sender`; the connection goes back to the pool once the response's
    /// headers are in (HTTP/1.1: once its body is read, which hyper waits for by itself).
    async fn send(
        &self,
        addr: SocketAddr,
        sender: Sender,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, Failed> {
        match sender {
            Sender::H1(mut s) => {
                let sent = s.try_send_request(request).await;
                let response = sent.map_err(|mut e| match e.take_message() {
                    Some(request) => Failed::NotSent(Box::new(request), e.into_error().to_string()),
                    None => Failed::Sent(e.into_error().to_string()),
                })?;
                if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    self.keep(addr, Sender::H1(s));
                }
                Ok(response)
            }
            Sender::H2(mut s) => {
                let sent = s.try_send_request(request).await;
                self.keep(addr, Sender::H2(s));
                sent.map_err(|mut e| match e.take_message() {
                    Some(request) => Failed::NotSent(Box::new(request), e.into_error().to_string()),
                    None => Failed::Sent(e.into_error().to_string()),
                })
            }
        }
    }

    /// A new upstream connection to `target`, as the L4 path makes one, and the HTTP
    /// handshake on it; its task reports it as a connection of this pod to the endpoint.
    async fn connect(
        &self,
        dir: &super::directory::Directory,
        target: &Target,
        timeout: std::time::Duration,
        open: Slot,
    ) -> Result<Sender, SendError> {
        let ctx = &*self.pod;
        let deadline = tokio::time::Instant::now() + timeout;
        let id = ctx.shared.connection_id();
        let send = outbound::send(ctx, dir, target, self.peer, id, deadline);
        let upstream = tokio::time::timeout_at(deadline, Box::pin(send))
            .await
            .unwrap_or(Err(SendError::Timeout { addr: target.addr }))?;
        let me = dir.peer(&ctx.workload);
        let mut pair = me
            .map(|me| Pair::default().with_source(me))
            .unwrap_or_default();
        pair.destination_port = target.addr.port();
        pair = pair.with_destination(&target.peer);
        let (transport, _) = upstream.transport();
        let details = Details {
            connection_id: id,
            transport,
            destination_address: Some(target.addr),
            ..Details::default()
        };
        let metrics = &ctx.shared.metrics;
        let conn = metrics.opened(Reporter::Source, &pair, details);
        let (io, local) = match upstream {
            Upstream::Tunnel { session, .. } => (Io::Tunnel(SessionIo::new(session)), None),
            Upstream::Quic { stream, .. } => (
                Io::Quic(crate::tunnel::stream_io::QuicIo::new(stream)),
                None,
            ),
            Upstream::Local(tcp, guard, admitted) => (
                Io::Local(tcp),
                Some((inbound::opened(metrics, admitted), guard)),
            ),
            Upstream::Plain(tcp) => (Io::Local(tcp), None),
        };
        let counted = Counted {
            io,
            sent: conn.traffic.from_app.clone(),
            received: conn.traffic.to_app.clone(),
        };
        let io = TokioIo::new(counted);
        let handshake_failed = |e: hyper::Error| SendError::Http {
            addr: target.addr,
            detail: e.to_string(),
        };
        let (sender, driver): (
            Sender,
            Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ) = if self.protocol == AppProtocol::Http {
            let (s, c) = http1::handshake(io).await.map_err(handshake_failed)?;
            (
                Sender::H1(s),
                Box::pin(async move {
                    let _ = c.with_upgrades().await;
                }),
            )
        } else {
            let (s, c) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(handshake_failed)?;
            (
                Sender::H2(s),
                Box::pin(async move {
                    let _ = c.await;
                }),
            )
        };
        // The connection lives until the endpoint or the client ends it, or a policy change
        // closes a same-node delivery; it is reported while it lives.
        tokio::spawn(async move {
            let _held = (conn, open);
            match local {
                Some((_report, guard)) => {
                    tokio::select! {
                        () = driver => {}
                        () = guard.closed().cancelled() => {}
                    }
                }
                None => driver.await,
            }
        });
        Ok(sender)
    }
}

/// Why a request did not get the endpoint's answer.
enum Failed {
    /// The connection could not take it; it was not sent and may go elsewhere.
    NotSent(Box<Request<Body>>, String),
    /// It was sent (or partly), so it is not tried again.
    Sent(String),
}

/// Whether the request asks to switch protocols (WebSocket) or to tunnel (`CONNECT`): its
/// connection becomes a byte stream once the endpoint agrees.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.method() == hyper::Method::CONNECT || req.headers().contains_key(header::UPGRADE)
}

/// Copies between the client's and the endpoint's upgraded connections until both end.
async fn splice(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(server)) = (client.await, server.await) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut server = TokioIo::new(server);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
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

/// The byte stream an upstream connection runs on.
enum Io {
    Tunnel(SessionIo),
    Quic(crate::tunnel::stream_io::QuicIo),
    Local(TcpStream),
}

/// An upstream connection's bytes, counted into its connection metrics as the relay counts
/// them: what the application sent, what it received.
struct Counted {
    io: Io,
    sent: Flow,
    received: Flow,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
            Io::Quic(s) => Pin::new(s).poll_read(cx, buf),
            Io::Local(s) => Pin::new(s).poll_read(cx, buf),
        };
        this.received.add(buf.filled().len() - before);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.io {
            Io::Tunnel(s) => Pin::new(s).poll_write(cx, data),
            Io::Quic(s) => Pin::new(s).poll_write(cx, data),
            Io::Local(s) => Pin::new(s).poll_write(cx, data),
        };
        if let Poll::Ready(Ok(n)) = &polled {
            this.sent.add(*n);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tunnel(s) => Pin::new(s).poll_flush(cx),
            Io::Quic(s) => Pin::new(s).poll_flush(cx),
            Io::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
            Io::Quic(s) => Pin::new(s).poll_shutdown(cx),
            Io::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
