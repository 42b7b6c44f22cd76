//! QUIC tunnels on the pod's UDP :15008: the endpoint's server configuration follows the
//! directory; each connection's handshake is bounded and counted against the limits (a
//! stranger proves its address with a Retry first), and each of its streams carries one
//! application connection, checked like a TLS tunnel's.

use std::{net::SocketAddr, sync::Arc};

use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};
use mesh_model::SpiffeId;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    refused, response, serve_request, tunnel_refused, TunnelClient, TunnelEnd, HANDSHAKE_TIMEOUT,
};
use crate::{
    metrics::{tunnels as tunnel_metrics, Outcome},
    proxy::{directory::Directory, relay, PodContext},
    transport::Transport,
    tunnel::{
        anchors::Credentials,
        header, quic,
        tls::{peer_identity, serial},
    },
};

impl TunnelEnd for quic::TunnelStream {
    const TRANSPORT: Transport = Transport::Quic;

    async fn answer(&mut self, response: &TunnelResponse) -> std::io::Result<()> {
        header::write_stream(&mut self.send, response)
            .await
            .map_err(Into::into)
    }

    async fn refuse(mut self, response: &TunnelResponse) {
        // Bounded: a peer that never takes the answer must not hold the stream.
        let answer = async {
            let _ = header::write_stream(&mut self.send, response).await;
            let _ = self.send.finish();
            let _ = self.send.stopped().await;
        };
        let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await;
    }

    fn into_stream(self) -> relay::Stream {
        relay::Stream::Quic(Box::new(self))
    }
}

/// Accepts QUIC tunnels on the pod's endpoint until `shutdown` fires. The endpoint presents
/// the pod's current certificate and trusts the current bundle: its server configuration
/// follows the directory. Connections outlive this loop (they end with the peer, or when the
/// pod leaves the mesh and the endpoint is closed), so a pod that is enrolled again keeps
/// its open tunnels, as with TLS.
pub async fn serve(
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
                    tokio::spawn(handle_connection(incoming, ctx.clone(), tracker.clone()));
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
async fn handle_connection(incoming: quinn::Incoming, ctx: Arc<PodContext>, tracker: TaskTracker) {
    let peer = incoming.remote_address();
    let peer_ip = peer.ip().to_canonical();
    let refused = |reason: &dyn std::fmt::Display| refused(&ctx, peer, Transport::Quic, reason);
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
        tunnel_refused(&ctx);
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
        tunnel_refused(&ctx);
        return;
    }
    // Held until the connection ends: `accept_bi` fails then.
    let tunnel = ctx
        .shared
        .tunnel_metrics
        .opened(tunnel_metrics::Direction::In, mesh_model::Transport::Quic);
    let certs = quic::peer_certificates(&conn);
    let id = match peer_identity(Some(&certs)) {
        Ok(id) => id,
        Err(e) => {
            conn.close(quic::code::DONE, b"no client identity");
            return refused(&format!("no client identity: {e}"));
        }
    };
    let Some(credentials) = ctx
        .shared
        .directory()
        .tls()
        .map(|tls| Credentials::of(&certs, tls, &ctx.shared.anchors))
    else {
        conn.close(quic::code::DONE, b"no trust bundle");
        return refused(&"this node has no trust bundle any more");
    };
    let from = Arc::new(TunnelClient {
        serial: certs.first().and_then(serial).unwrap_or_default(),
        id,
        addr: SocketAddr::new(peer_ip, peer.port()),
        credentials,
    });
    drop(certs);
    ctx.shared.tunnel_metrics.count(Outcome::QuicInAccepted);
    tracing::debug!(workload = %ctx.workload, %peer, client = %from.id, "QUIC connection accepted");
    loop {
        let (send, recv) = tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok(stream) => stream,
                Err(_) => break,
            },
            () = from.credentials.withdrawn.cancelled() => {
                tracing::warn!(workload = %ctx.workload, %peer, client = %from.id, "closing a QUIC tunnel: {}", relay::BY_TRUST);
                conn.close(quic::code::DONE, b"trust root withdrawn");
                break;
            }
        };
        tunnel.stream();
        let mut stream = quic::TunnelStream::new(send, recv);
        if !from.credentials.usable() {
            // The source replaces a connection whose stream fails before the answer.
            tracing::debug!(workload = %ctx.workload, %peer, client = %from.id, "a stream on a QUIC connection past its use; refusing it");
            let _ = stream.send.reset(quic::code::DONE);
            continue;
        }
        tracker.spawn(handle_stream(stream, from.clone(), ctx.clone()));
    }
    drop(permit);
}

/// One stream of a QUIC tunnel: its header, then the tunnel's sequence ([`serve_request`]).
async fn handle_stream(
    mut stream: quic::TunnelStream,
    from: Arc<TunnelClient>,
    ctx: Arc<PodContext>,
) {
    let ctx = &*ctx;
    let peer = from.addr;
    let limits = &ctx.shared.limits;
    let _permit = match limits.open(&ctx.load, &ctx.workload, peer.ip(), false) {
        Ok(permit) => permit,
        Err(limit) => {
            tunnel_refused(ctx);
            let reason = format!("this node is at its {limit} limit");
            stream.refuse(&response(Status::Overloaded, &reason)).await;
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
            tunnel_refused(ctx);
            tracing::warn!(workload = %ctx.workload, %peer, client = %from.id, %reason, "QUIC tunnel refused");
            return stream.reset();
        }
    };
    stream.early = early;
    let dir = ctx.shared.directory();
    serve_request(ctx, &dir, &request, &from, stream).await;
}
