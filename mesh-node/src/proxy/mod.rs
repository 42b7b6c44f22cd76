//! The node proxy: listeners inside each enrolled pod's netns and the connections they accept.
//!
//! - `outbound.rs`: connections a pod's application made (redirected by the connect hooks);
//!   routed by `directory.rs` to a tunnel, to a pod on this node, or out unchanged.
//! - `inbound/`: the pod's tunnel listeners on :15008 (`tls.rs`, `quic.rs`) and its plaintext
//!   listener on :15006 (`plaintext.rs`, PERMISSIVE mode), around the checks every delivery to
//!   a local pod passes, whether it came through a tunnel or from a pod on this node (`mod.rs`).
//! - `local.rs`: the pods enrolled on this node, for deliveries between two of them.
//! - `authz.rs`: the policy check on every delivery, its logs and counters, and the closing of
//!   open connections that a policy change denies.
//! - `relay.rs`: copying between the two halves of a connection, with half-close and resets
//!   passed on; the tunnel's side of it (records sealed and opened in place) is
//!   `tunnel/copy.rs`.
//! - `limits.rs`: how many connections and handshakes each pod and each source may have.
//! - `http.rs`: ports that declare HTTP, served request by request over upstream connections
//!   made as `outbound.rs` makes any;
//! - `traffic/`: endpoint choice, connect attempts, per-Service limits, outlier ejection,
//!   rate limits and connection expiry (TrafficPolicy), with the state that outlives a
//!   directory rebuild.
//! - `kernel_policy.rs`: what the kernel refuses before the proxy sees it (fast deny, the
//!   inbound mTLS mode).

pub mod authz;
pub mod directory;
pub mod http;
pub mod inbound;
pub mod kernel_policy;
pub mod labels;
pub mod limits;
pub mod local;
pub mod outbound;
pub mod relay;
pub mod traffic;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{atomic::AtomicU64, Arc, OnceLock},
    time::{Duration, Instant},
};

use mesh_ebpf_common::{OUTBOUND_PORT, PLAINTEXT_PORT};
use std::future::Future;

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    capture::Capture,
    netns::{tcp_socket, NetnsWorker},
    transparent::{self, InUse, NetnsRoutes, PlaintextPeers},
    workloads::WorkloadId,
};
use directory::Directory;

/// The pod ports the node proxy's own listeners take. A connection is never delivered to
/// them: the proxy would connect to itself, again and again.
pub const RESERVED_PORTS: [u16; 3] = [OUTBOUND_PORT, PLAINTEXT_PORT, crate::tunnel::TUNNEL_PORT];

/// State every pod's listeners share: one per daemon.
pub struct Shared {
    pub capture: Arc<Capture>,
    /// Per workload pair connection metrics (Prometheus).
    pub metrics: Arc<crate::metrics::ConnectionMetrics>,
    /// Per workload pair request metrics of ports that declare HTTP (Prometheus).
    pub request_metrics: Arc<crate::metrics::RequestMetrics>,
    /// Tunnels open and the connections each carried (Prometheus).
    pub tunnel_metrics: Arc<crate::metrics::TunnelMetrics>,
    pub connect_timeout: Duration,
    /// The current routing view; replaced whole when the mesh view changes.
    pub directory: watch::Receiver<Arc<Directory>>,
    /// Enrolled pods by workload, for deliveries between pods of this node (the enroller
    /// owns the set).
    pub local: local::LocalPods,
    pub authz: Arc<authz::Authz>,
    /// Idle tunnel sessions to reuse.
    pub tunnels: crate::tunnel::pool::Pool,
    /// QUIC connections to other nodes' pods.
    pub quic: crate::tunnel::quic::Connections,
    /// What each pod and each source may have open or in progress.
    pub limits: Arc<limits::Limits>,
    /// The trust roots in force, which tunnels watch.
    pub anchors: Arc<crate::tunnel::anchors::Anchors>,
    /// Per-Service state: endpoints' load and health, limits (TrafficPolicy).
    pub traffic: traffic::Traffic,
    /// On demand: where lookups go (the config stream); `None` when this node holds every
    /// workload of the mesh.
    pub lookups: Option<crate::control::Lookups>,
    next_connection_id: AtomicU64,
}

/// How long a connection waits for the control plane to answer a lookup (on demand). Past it
/// the connection is refused, never passed around the mesh.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(2);

impl Shared {
    pub fn new(
        capture: Arc<Capture>,
        metrics: &crate::metrics::Metrics,
        connect_timeout: Duration,
        directory: watch::Receiver<Arc<Directory>>,
        local: local::LocalPods,
        limits: Arc<limits::Limits>,
    ) -> Self {
        Self {
            capture,
            metrics: metrics.connections.clone(),
            request_metrics: metrics.requests.clone(),
            tunnel_metrics: metrics.tunnels.clone(),
            connect_timeout,
            directory,
            local,
            authz: Arc::default(),
            tunnels: crate::tunnel::pool::Pool::default(),
            quic: crate::tunnel::quic::Connections::default(),
            limits,
            anchors: Arc::default(),
            traffic: traffic::Traffic::new(metrics.traffic.clone()),
            lookups: None,
            // Unique per daemon run; the pid keeps ids from two runs apart in the logs.
            next_connection_id: AtomicU64::new(u64::from(std::process::id()) << 32),
        }
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.directory.borrow().clone()
    }

    /// `current`, or once it is not ready for `pod` (the pod unknown, or no certificate for
    /// it yet) the first directory that is, waiting up to the connect timeout (then the
    /// directory as it is, whatever it knows).
    pub async fn directory_for(&self, pod: &WorkloadId, current: Arc<Directory>) -> Arc<Directory> {
        let ready = |d: &Directory| {
            d.peer(pod).is_some_and(|me| {
                d.tls()
                    .is_some_and(|t| t.has_svid(&me.identity.to_string()))
            })
        };
        if ready(&current) {
            return current;
        }
        tracing::debug!(workload = %pod, "waiting for this pod's identity before connecting");
        let deadline = Instant::now() + self.connect_timeout;
        let mut rx = self.directory.clone();
        loop {
            let latest = rx.borrow_and_update().clone();
            if ready(&latest) || Instant::now() >= deadline {
                return latest;
            }
            // A certificate that arrives does not change the directory (the TLS configs read
            // the store), so this also polls, briefly.
            let tick = Duration::from_millis(20);
            if let Ok(Err(_)) = tokio::time::timeout(tick, rx.changed()).await {
                // The directory's owner is gone (shutdown): no change will wake us.
                tokio::time::sleep(tick).await;
            }
        }
    }

    /// `current`, or once it lacks what `wanted` names (on demand), the first directory
    /// that has it: the lookups go to the control plane, and the answer is waited for up to
    /// [`LOOKUP_WAIT`] (then the directory as it is; the caller refuses what is still
    /// unresolved).
    pub async fn resolved(
        &self,
        current: Arc<Directory>,
        wanted: impl Fn(&Directory) -> Vec<crate::control::Lookup>,
    ) -> Arc<Directory> {
        let Some(lookups) = &self.lookups else {
            return current;
        };
        let first = wanted(&current);
        if first.is_empty() {
            return current;
        }
        let deadline = Instant::now() + LOOKUP_WAIT;
        let mut rx = self.directory.clone();
        rx.mark_unchanged();
        for lookup in first {
            let sent = tokio::time::timeout_at(deadline.into(), lookups.send(lookup)).await;
            if !matches!(sent, Ok(Ok(()))) {
                return self.directory();
            }
        }
        loop {
            let latest = rx.borrow_and_update().clone();
            if wanted(&latest).is_empty() {
                return latest;
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                // The deadline, or the directory's owner gone (shutdown).
                _ => return self.directory(),
            }
        }
    }

    pub fn connection_id(&self) -> u64 {
        self.next_connection_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// One enrolled pod: where its sockets are made, and what the shared state is.
pub struct PodContext {
    pub workload: WorkloadId,
    pub netns: NetnsWorker,
    pub netns_cookie: u64,
    /// The pod's UDP endpoint on :15008 for QUIC tunnels both ways (connected mode only).
    pub quic: Option<quinn::Endpoint>,
    /// The pod's connections and handshakes, counted against the limits.
    pub load: Arc<limits::PodLoad>,
    pub shared: Arc<Shared>,
    /// Cancelled when this daemon stops taking the pod's connections (taken over, shutting
    /// down, the pod left the mesh): its accept loops end, and its idle tunnel sessions close
    /// so that their sources open new ones, to whichever daemon accepts now.
    pub closing: CancellationToken,
    /// The pod's return routing, once enrolment has made it: connections to its application
    /// come from their source's address (see `transparent`).
    pub routes: OnceLock<Arc<NetnsRoutes>>,
    /// The plaintext connections the pod holds, whose address pairs transparent connections
    /// must not repeat.
    pub plaintext_peers: Arc<PlaintextPeers>,
}

impl PodContext {
    /// Connects to `dst` from inside this pod's netns, giving up after the connect timeout.
    /// The connect hooks let it through: it is made by a task of the daemon's cgroup.
    pub async fn connect_in_pod(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = self
            .netns
            .run(move || tcp_socket(dst))
            .await
            .map_err(io::Error::other)??;
        self.connect_made(dst, socket).await
    }

    /// Connects to the application at `dst` in this pod so that it sees the connection come
    /// from `source`'s address, where the pod's return routing is in place and `source` can
    /// be used (the connection then counts on the routing until the [`InUse`] is dropped);
    /// else from the pod's own address (`connect_in_pod`).
    pub async fn connect_to_app(
        &self,
        dst: SocketAddr,
        source: IpAddr,
    ) -> io::Result<(TcpStream, Option<InUse>)> {
        let routed = self.routes.get().filter(|r| r.families().routes(dst));
        let from = routed.zip(transparent::usable_source(source, dst));
        // Counted before the socket is made, so the routing cannot go while it connects.
        let in_use = from.and_then(|(routes, from)| Some((routes.in_use()?, from)));
        let Some((in_use, from)) = in_use else {
            return Ok((self.connect_in_pod(dst).await?, None));
        };
        let peers = self.plaintext_peers.clone();
        let made = self
            .netns
            .run(move || transparent::socket_from(from, dst, &peers))
            .await
            .map_err(io::Error::other)?;
        // A socket that cannot be made from the source's address (no free port, an address
        // the kernel refuses), or whose connect finds no port left for this source toward
        // `dst`: not the application's failure, so it gets the pod's address instead.
        let error = match made {
            Ok(socket) => match self.connect_made(dst, socket).await {
                Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => e,
                other => return other.map(|stream| (stream, Some(in_use))),
            },
            Err(e) => e,
        };
        tracing::debug!(workload = %self.workload, %from, %dst, %error, "cannot connect from the source's address; connecting from the pod's");
        self.shared.metrics.delivered_from_own_address();
        drop(in_use);
        Ok((self.connect_in_pod(dst).await?, None))
    }

    /// Connects `socket` (made on the pod's netns thread) to `dst`, giving up after the
    /// connect timeout.
    async fn connect_made(
        &self,
        dst: SocketAddr,
        socket: socket2::Socket,
    ) -> io::Result<TcpStream> {
        let socket = TcpSocket::from_std_stream(socket.into());
        let timeout = self.shared.connect_timeout;
        let stream = match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Binds a listener; call on the pod's netns thread.
pub fn bind_in_netns(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(addr)?;
    // A restarted daemon must be able to bind while old accepted sockets linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// What a pod's accept loop runs with.
pub struct Serving {
    pub ctx: Arc<PodContext>,
    /// Stops the loop (the listener closes with it, unless another daemon holds it too).
    pub shutdown: CancellationToken,
    /// Every accepted connection is spawned on it, so shutdown can drain them.
    pub tracker: TaskTracker,
    /// Accepting starts once this is true: a daemon taking over starts on the handed-over
    /// listeners only once it is up, while the old daemon still accepts on them.
    pub accepting: tokio::sync::watch::Receiver<bool>,
}

/// Accepts on one of a pod's listeners until `shutdown` fires; each connection runs `handle`
/// on the tracker, so shutdown can drain them.
pub async fn serve<F, Fut>(listener: TcpListener, serving: Serving, handle: F)
where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Serving {
        ctx,
        shutdown,
        tracker,
        mut accepting,
    } = serving;
    tokio::select! {
        _ = shutdown.cancelled() => return,
        started = accepting.wait_for(|go| *go) => {
            if started.is_err() {
                return;
            }
        }
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(handle(stream, peer, ctx.clone()));
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning on the error.
                let addr = listener.local_addr().ok();
                tracing::warn!(workload = %ctx.workload, ?addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{inbound, outbound};

    fn future_size<A, B, C, F: std::future::Future>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each open connection is one task holding one of these futures for its whole life, so
    /// their size is memory per idle connection (the bench's idle figure). What only a
    /// handshake or a QUIC stream needs is boxed; this keeps it that way.
    #[test]
    fn connection_tasks_stay_small() {
        const LIMIT: usize = 2560;
        for (name, size) in [
            ("outbound::handle", future_size(outbound::handle)),
            ("inbound::handle", future_size(inbound::handle)),
            (
                "inbound::handle_plaintext",
                future_size(inbound::handle_plaintext),
            ),
        ] {
            assert!(size <= LIMIT, "{name} is {size} bytes, over {LIMIT}");
        }
    }
}
