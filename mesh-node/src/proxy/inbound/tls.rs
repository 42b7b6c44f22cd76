//! The pod's tunnel listener on :15008, over TLS: the handshake (client certificate required
//! and verified), then one connection after another on the same session (see
//! `tunnel/pool.rs`), each header checked as a new tunnel's would be.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};
use tokio::net::TcpStream;

use super::{
    refused, response, serve_request, tunnel_refused, TunnelClient, TunnelEnd, HANDSHAKE_TIMEOUT,
};
use crate::{
    metrics::tunnels as tunnel_metrics,
    proxy::{
        relay::{self, reset},
        PodContext,
    },
    transport::Transport,
    tunnel::{
        anchors::Credentials,
        header::{self, HeaderError},
        pool,
        tls::{peer_identity, serial},
        Session,
    },
};

impl TunnelEnd for Box<Session> {
    const TRANSPORT: Transport = Transport::Tls;

    async fn answer(&mut self, response: &TunnelResponse) -> std::io::Result<()> {
        header::write(self, response).await.map_err(Into::into)
    }

    async fn refuse(mut self, response: &TunnelResponse) {
        let _ = header::write(&mut self, response).await;
        let _ = self.close().await;
    }

    fn into_stream(self) -> relay::Stream {
        relay::Stream::Tunnel(self)
    }
}

/// One tunnel from another node.
pub async fn handle(tcp: TcpStream, peer: SocketAddr, ctx: Arc<PodContext>) {
    let ctx = &*ctx;
    let refused = |reason: &dyn std::fmt::Display| refused(ctx, peer, Transport::Tls, reason);
    // Before anything else: the limits log their own refusals, once in a while.
    let limits = &ctx.shared.limits;
    let dir = ctx.shared.directory();
    let stranger = dir.peer_by_addr(peer.ip()).is_none();
    let Ok(permit) = limits.handshake(&ctx.load, &ctx.workload, peer.ip(), stranger) else {
        tunnel_refused(ctx);
        return reset(tcp);
    };
    // Boxed, as the credentials below.
    let mut permit = Box::new(permit);
    let _ = tcp.set_nodelay(true);
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
    let id = match peer_identity(Some(&peer_certs)) {
        Ok(id) => id,
        // The verifier already required a SPIFFE ID; this is a belt-and-braces check.
        Err(e) => return refused(&format!("no client identity: {e}")),
    };
    // Boxed: the session's task keeps only a pointer to what it holds for its life.
    let client = Box::new(TunnelClient {
        serial: peer_certs.first().and_then(serial).unwrap_or_default(),
        credentials: Credentials::of(&peer_certs, tls, &ctx.shared.anchors),
        id,
        addr: peer,
    });
    drop(peer_certs);
    let credentials = &client.credentials;
    // The session takes no connection once its handshake is too old, its client's
    // certificate has expired or its root was withdrawn.
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
        // A reused session is not a new connection to this daemon: once it stops taking the
        // pod's connections (taken over, shutting down), the session ends here, in order, and
        // its source opens a new one to whichever daemon accepts now. Serving on would keep
        // this daemon from ever draining while its sources stay busy.
        if !first && ctx.closing.is_cancelled() {
            // Boxed, as everything the connection's task only needs once.
            return Box::pin(close_for_good(ctx, peer, stream)).await;
        }
        // Boxed: only the relay's state stays in the connection's task for its life.
        let read = Box::pin(async {
            tokio::select! {
                read = tokio::time::timeout(wait, header::read(&mut stream)) => Wait::Read(read),
                () = credentials.withdrawn.cancelled() => Wait::Withdrawn,
                () = ctx.closing.cancelled(), if !first => Wait::Closing,
            }
        })
        .await;
        let read = match read {
            Wait::Read(read) => read,
            Wait::Withdrawn => {
                tracing::warn!(workload = %ctx.workload, %peer, client = %client.id, "closing a tunnel session: {}", relay::BY_TRUST);
                return reset(stream);
            }
            Wait::Closing => return Box::pin(close_for_good(ctx, peer, stream)).await,
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
                            "a record from {} failed authentication (tampered with or corrupted on the way): {e}",
                            client.id
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
            tracing::debug!(workload = %ctx.workload, %peer, client = %client.id, "a header on a session past its use; closing it");
            let _ = stream.close().await;
            return;
        }
        if first {
            if let Err(limit) = permit.opened(&ctx.workload) {
                tunnel_refused(ctx);
                let reason = format!("this node is at its {limit} limit");
                let _ = header::write(&mut stream, &response(Status::Overloaded, &reason)).await;
                let _ = stream.close().await;
                return;
            }
        }
        first = false;
        stream.carry();
        match serve_request(ctx, &dir, &request, &client, stream).await {
            Some(session) => stream = session,
            None => return,
        }
    }
}

/// What ended the wait for a session's next header.
enum Wait<T> {
    Read(T),
    /// The root of the client's certificate was withdrawn.
    Withdrawn,
    /// This daemon no longer takes the pod's connections.
    Closing,
}

/// Ends a reused session in order because this daemon no longer takes the pod's
/// connections, and waits a little for the source to end its side (a header it sent
/// meanwhile is dropped unanswered, which it takes as a closed idle session and retries):
/// a socket closed with bytes unread would reset the source instead.
async fn close_for_good(ctx: &PodContext, peer: SocketAddr, mut stream: Box<Session>) {
    tracing::debug!(workload = %ctx.workload, %peer, "closing an idle tunnel session: this daemon no longer takes the pod's connections");
    let _ = tokio::time::timeout(CLOSE_WAIT, stream.close_and_drain()).await;
}

/// How long a closing session waits for its source to end its side.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
