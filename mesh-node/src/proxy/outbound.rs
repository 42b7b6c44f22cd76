//! Outbound: connections an enrolled pod's application made, redirected here by the connect
//! hooks. Each is matched with its original destination and, for now, forwarded in plaintext
//! from inside the pod's netns (the tunnel replaces this hop later).

use std::{
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use mesh_ebpf_common::{OUTBOUND_PORT, PROXY_MARK};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::ProxyStats;
use crate::{capture::Capture, netns::NetnsWorker, workloads::WorkloadId};

/// Everything the outbound path of one pod needs.
pub struct PodContext {
    pub workload: WorkloadId,
    pub netns: NetnsWorker,
    pub netns_cookie: u64,
    pub capture: Arc<Capture>,
    pub stats: Arc<ProxyStats>,
    pub connect_timeout: Duration,
}

/// Listener addresses inside every pod: the connect hooks rewrite to exactly these.
pub fn listen_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
    ]
}

/// Binds a listener; call on the pod's netns thread.
pub fn bind_in_netns(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // A restarted daemon must be able to bind while old accepted sockets linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts until `shutdown` fires; each connection runs on `tracker` so shutdown can drain them.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<PodContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                tracker.spawn(async move { handle(client, peer, &ctx).await });
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning on the error.
                tracing::warn!(workload = %ctx.workload, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, ctx: &PodContext) {
    let Some(dst) = ctx.capture.original_destination(ctx.netns_cookie, peer) else {
        ctx.stats.no_orig_dst.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            workload = %ctx.workload, %peer,
            "no original destination recorded for this connection (original-destination map full?); resetting it"
        );
        reset(client);
        return;
    };
    let upstream = match connect_upstream(ctx, dst).await {
        Ok(s) => s,
        Err(e) => {
            ctx.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                workload = %ctx.workload, %peer, %dst, error = %e,
                "upstream connect failed; resetting the client connection"
            );
            reset(client);
            return;
        }
    };
    ctx.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    relay(client, upstream, ctx, dst).await;
}

/// Opens a socket in the pod's netns, marked so the connect hooks let it through, and
/// connects it to the original destination.
async fn connect_upstream(ctx: &PodContext, dst: SocketAddr) -> io::Result<TcpStream> {
    let std_stream = ctx
        .netns
        .run(move || -> io::Result<std::net::TcpStream> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_mark(PROXY_MARK)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .await
        .map_err(io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std_stream);
    match tokio::time::timeout(ctx.connect_timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:?}", ctx.connect_timeout),
        )),
    }
}

/// Copies both ways. A FIN is passed on as a FIN (half-close); a reset or error on either side
/// resets both, so neither peer mistakes a failure for a clean end of stream.
async fn relay(mut client: TcpStream, mut upstream: TcpStream, ctx: &PodContext, dst: SocketAddr) {
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            ctx.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
            ctx.stats
                .bytes_received
                .fetch_add(received, Ordering::Relaxed);
        }
        Err(e) => {
            ctx.stats.reset.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(workload = %ctx.workload, %dst, error = %e, "relay ended with an error; resetting both sides");
            reset(client);
            reset(upstream);
        }
    }
}

/// Closes with RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
