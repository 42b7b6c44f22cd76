//! Plaintext to the pod on :15006, handed over by the inbound program (PERMISSIVE mode): from
//! outside the mesh, so all policy knows of the client is its address.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    authorize_and_connect, check_destination, ended_by, opened, pair_at_destination, Admitted,
    Status,
};
use crate::{
    metrics::{Details, Plaintext},
    proxy::{
        authz,
        relay::{self, reset},
        PodContext,
    },
    transport::Transport,
};

/// One plaintext connection to the pod, handed over by the inbound program (PERMISSIVE mode).
/// Its local address is the destination the client asked for; all policy knows of the client
/// is its address.
pub async fn handle(client: TcpStream, peer: SocketAddr, ctx: Arc<PodContext>) {
    let ctx = &*ctx;
    let count = |outcome| ctx.shared.metrics.plaintext(outcome);
    let limits = &ctx.shared.limits;
    // Plaintext comes from outside the mesh.
    let Ok(_permit) = limits.open(&ctx.load, &ctx.workload, peer.ip(), true) else {
        count(Plaintext::Refused);
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let destination = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(workload = %ctx.workload, %peer, error = %e, "plaintext connection without a local address; resetting it");
            count(Plaintext::Refused);
            reset(client);
            return;
        }
    };
    // Held before the connection to the application is made, so that no transparent
    // connection from this client's address takes the client's port.
    let _held = ctx.plaintext_peers.hold(peer, destination);
    let dir = ctx.shared.directory();
    if let Err(r) = check_destination(ctx, &dir, destination) {
        tracing::warn!(workload = %ctx.workload, %peer, reason = %r.reason, "plaintext connection refused; resetting it");
        count(Plaintext::Refused);
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
    let pair = pair_at_destination(ctx, &dir, None, peer.ip(), destination.port());
    let details = Details {
        connection_id: id,
        source_address: Some(peer),
        destination_address: Some(destination),
        transport: Transport::Plaintext,
        ..Details::default()
    };
    // The application sees the client's address, as without the mesh.
    let from = Some(peer.ip());
    let admitted =
        authorize_and_connect(ctx, request, None, from, pair.clone(), details.clone()).await;
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
                count(Plaintext::Denied);
            } else {
                count(Plaintext::Refused);
                tracing::info!(workload = %ctx.workload, %peer, reason = %r.reason, "plaintext: connect to the application failed; resetting the client");
            }
            reset(client);
            return;
        }
    };
    count(Plaintext::Admitted);
    tracing::debug!(workload = %ctx.workload, %peer, %destination, id, "plaintext connection admitted");
    let upstream = relay::Stream::Plain(upstream);
    let mut conn = opened(&ctx.shared.metrics, report);
    // The relay holds the client here, not the application.
    let traffic = conn.traffic.swapped();
    if let Err(e) = relay::relay(client, upstream, Some(guard.closed()), &traffic).await {
        conn.fail(ended_by(&guard, None));
        tracing::debug!(workload = %ctx.workload, error = %e, "plaintext relay ended with an error; both sides reset");
    }
}
