//! Keeps the set of captured pods equal to the desired set of workloads.
//!
//! For each pod: a thread in its netns, outbound listeners on loopback there, the tunnel
//! listener on :15008 and the plaintext listener on :15006 with the inbound program on the
//! pod's interfaces, also those added later (connected mode), and its netns cookie in the
//! `ENROLLED` map. The kernel side is pinned and outlives the daemon; a pod leaves it only
//! when it leaves the set (or, after a restart, when the first complete set lacks it).
//! [`Enroller::apply`] prepares everything a new set needs before changing anything, so a bad
//! set (a missing netns, a port already taken) leaves the current one untouched.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use std::os::fd::AsFd as _;
use std::sync::OnceLock;

use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    capture::{interfaces, CaptureError, Inbound},
    handoff::{protocol::Item, sockets::Sockets},
    netns::{self, NetnsError, NetnsWorker},
    proxy::{self, inbound, local::LocalPodsOwner, outbound, PodContext, Shared},
    transparent,
    workloads::{Workload, WorkloadId},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("workload {workload}: {source}")]
    Netns {
        workload: WorkloadId,
        source: NetnsError,
    },
    #[error("workload {workload}: cannot listen on {addr} in {netns}: {source}")]
    Listen {
        workload: WorkloadId,
        addr: std::net::SocketAddr,
        netns: String,
        source: std::io::Error,
    },
    #[error(
        "workload {workload}: cannot open UDP port {port} (QUIC tunnels) in {netns}: {source}"
    )]
    ListenUdp {
        workload: WorkloadId,
        port: u16,
        netns: String,
        source: std::io::Error,
    },
    #[error("workload {workload}: {source}")]
    Capture {
        workload: WorkloadId,
        source: CaptureError,
    },
    #[error("workload {workload}: cannot attach the inbound program to interface {interface:?}: {reason}")]
    Inbound {
        workload: WorkloadId,
        interface: String,
        reason: String,
    },
}

struct Pod {
    workload: Workload,
    netns_cookie: u64,
    /// Its application sees its clients' addresses (the return routing is in place).
    routed: bool,
    shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Outbound,
    Tunnel,
    Plaintext,
}

/// Listeners bound (and the inbound program attached) for a pod that is not enrolled yet.
struct Prepared {
    ctx: Arc<PodContext>,
    /// The pod's QUIC endpoint (connected mode).
    quic: Option<quinn::Endpoint>,
    workload: Workload,
    /// With whether each was handed over by the old daemon.
    listeners: Vec<(Role, std::net::TcpListener, bool)>,
    inbound: Vec<Inbound>,
    /// The pod's QUIC socket the old daemon handed over, for its endpoint at takeover.
    pending_quic: Option<std::net::UdpSocket>,
}

pub struct Enroller {
    shared: Arc<Shared>,
    /// The enrolled pods as the proxy finds them; written here only.
    local: LocalPodsOwner,
    /// Whether pods get tunnel and plaintext listeners and the inbound program (connected mode;
    /// offline mode has no certificates and no policy).
    tunnels: bool,
    pods: BTreeMap<WorkloadId, Pod>,
    /// Each enrolled netns's QUIC endpoint, by netns cookie. It outlives a pod that is
    /// enrolled again with changed settings (its UDP port stays bound by open connections, and
    /// they carry on); it is closed when no pod in its netns is enrolled any more.
    quic: HashMap<u64, quinn::Endpoint>,
    /// Every accepted connection, so shutdown can wait for them to finish.
    connections: TaskTracker,
    /// The sockets handed over by the daemon this one took over from, and this daemon's own,
    /// to hand over in turn.
    sockets: Arc<Sockets>,
    /// Whether the pods' listeners accept yet: a daemon taking over starts accepting on the
    /// handed-over sockets only once it is up.
    accepting: watch::Receiver<bool>,
    /// The pods' return routing (connected mode).
    routes: Arc<transparent::Routes>,
    /// The cookie of the daemon's own netns, which gets no return routing.
    own_netns: u64,
}

impl Enroller {
    pub fn new(
        shared: Arc<Shared>,
        local: LocalPodsOwner,
        tunnels: bool,
        sockets: Arc<Sockets>,
        accepting: watch::Receiver<bool>,
        sysctl_dir: std::path::PathBuf,
    ) -> Self {
        Self {
            routes: transparent::Routes::new(sysctl_dir, shared.capture.clone()),
            own_netns: netns::current_netns_cookie().unwrap_or(0),
            shared,
            local,
            tunnels,
            pods: BTreeMap::new(),
            quic: HashMap::new(),
            connections: TaskTracker::new(),
            sockets,
            accepting,
        }
    }

    pub fn enrolled(&self) -> usize {
        self.pods.len()
    }

    pub fn is_enrolled(&self, id: &WorkloadId) -> bool {
        self.pods.contains_key(id)
    }

    /// Whether the captured set is `desired` already.
    pub fn is_current(&self, desired: &BTreeMap<WorkloadId, Workload>) -> bool {
        desired.len() == self.pods.len()
            && desired
                .iter()
                .all(|(id, w)| self.pods.get(id).is_some_and(|p| p.workload == *w))
    }

    /// Each enrolled pod with its netns cookie (the key of its entries in the kernel maps).
    pub fn pods(&self) -> impl Iterator<Item = (&WorkloadId, u64)> {
        self.pods.iter().map(|(id, pod)| (id, pod.netns_cookie))
    }

    /// Makes the captured set equal to `desired`, or changes nothing and returns why not.
    pub async fn apply(
        &mut self,
        desired: BTreeMap<WorkloadId, Workload>,
    ) -> Result<(), EnrollError> {
        let departed: Vec<WorkloadId> = self
            .pods
            .iter()
            .filter(|(id, pod)| desired.get(*id) != Some(&pod.workload))
            .map(|(id, _)| id.clone())
            .collect();
        // A netns that moves to another workload (a rename) is released first: its listeners
        // hold the outbound port that the new workload's listeners need.
        for id in &departed {
            let netns_reused = desired
                .values()
                .any(|w| w.netns == self.pods[id].workload.netns);
            if netns_reused {
                if let Some(pod) = self.pods.remove(id) {
                    self.stop(&pod).await;
                    tracing::info!(workload = %id, "unenrolled (netns reassigned)");
                }
            }
        }
        let mut prepared = Vec::new();
        for (id, workload) in &desired {
            let unchanged = self.pods.get(id).is_some_and(|p| p.workload == *workload);
            if !unchanged {
                match self.prepare(workload.clone()).await {
                    Ok(p) => prepared.push(p),
                    Err(e) => {
                        self.discard(prepared);
                        return Err(e);
                    }
                }
            }
        }
        // Pods the kernel did not hold yet; on failure only they are taken out again (one an
        // earlier daemon enrolled stays captured).
        let mut added: Vec<u64> = Vec::new();
        let mut failed = None;
        for p in &prepared {
            match self.shared.capture.enroll(p.ctx.netns_cookie) {
                Ok(true) => added.push(p.ctx.netns_cookie),
                Ok(false) => {}
                Err(source) => {
                    failed = Some((p.workload.id.clone(), source));
                    break;
                }
            }
        }
        if let Some((workload, source)) = failed {
            for cookie in added {
                let _ = self.shared.capture.unenroll(cookie);
            }
            self.discard(prepared);
            return Err(EnrollError::Capture { workload, source });
        }
        // A departed pod whose netns the new set enrolls again (under another id, or another
        // path to the same netns) keeps its kernel side: only its tasks stop.
        let fresh: HashSet<u64> = prepared.iter().map(|p| p.ctx.netns_cookie).collect();
        for id in departed {
            if let Some(pod) = self.pods.remove(&id) {
                if fresh.contains(&pod.netns_cookie) {
                    self.close(&pod);
                } else {
                    self.stop(&pod).await;
                }
                tracing::info!(workload = %id, "unenrolled");
            }
        }
        for p in prepared {
            if self.tunnels {
                self.route_replies(&p).await;
            }
            let shutdown = p.ctx.closing.clone();
            for (role, listener, _) in p.listeners {
                // Registering with the reactor needs the runtime, so it happens here rather
                // than on the netns thread.
                match TcpListener::from_std(listener) {
                    Ok(l) => {
                        let serving = proxy::Serving {
                            ctx: p.ctx.clone(),
                            shutdown: shutdown.clone(),
                            tracker: self.connections.clone(),
                            accepting: self.accepting.clone(),
                        };
                        match role {
                            Role::Outbound => {
                                tokio::spawn(proxy::serve(l, serving, outbound::handle))
                            }
                            Role::Tunnel => tokio::spawn(proxy::serve(l, serving, inbound::handle)),
                            Role::Plaintext => {
                                tokio::spawn(proxy::serve(l, serving, inbound::handle_plaintext))
                            }
                        };
                    }
                    Err(e) => {
                        tracing::error!(workload = %p.workload.id, error = %e, "cannot register listener")
                    }
                }
            }
            if let (Some(socket), Some(endpoint)) = (p.pending_quic, &p.quic) {
                self.sockets
                    .defer_quic(p.ctx.netns_cookie, endpoint.clone(), socket);
            }
            if let Some(endpoint) = p.quic {
                self.quic.insert(p.ctx.netns_cookie, endpoint.clone());
                tokio::spawn(inbound::serve_quic(
                    endpoint,
                    p.ctx.clone(),
                    shutdown.clone(),
                    self.connections.clone(),
                ));
            }
            if self.tunnels {
                tokio::spawn(interfaces::watch(
                    p.workload.id.clone(),
                    p.ctx.netns.clone(),
                    self.shared.capture.clone(),
                    p.ctx.netns_cookie,
                    shutdown.clone(),
                ));
            }
            tracing::info!(workload = %p.workload.id, netns = %p.workload.netns.display(), cookie = p.ctx.netns_cookie, "enrolled");
            self.local.insert(p.ctx.clone());
            self.pods.insert(
                p.workload.id.clone(),
                Pod {
                    netns_cookie: p.ctx.netns_cookie,
                    routed: p.ctx.routes.get().is_some(),
                    workload: p.workload,
                    shutdown,
                },
            );
        }
        self.close_unused_endpoints();
        Ok(())
    }

    /// Undoes what preparing attached (the pinned links would outlive the `Prepared`), and
    /// keeps its sockets for the next try: one handed over by the old daemon carries that
    /// daemon's accept queue, which a new bind could not have (nor could it bind while the
    /// old one holds the port).
    fn discard(&self, prepared: Vec<Prepared>) {
        for p in prepared {
            let attached: Vec<u32> = p.inbound.iter().map(|i| i.ifindex).collect();
            let cookie = p.ctx.netns_cookie;
            self.shared.capture.detach_inbound(cookie, &attached);
            self.give_back(cookie, p.listeners);
            if let Some(socket) = p.pending_quic {
                let item = Item::Udp {
                    netns_cookie: cookie,
                };
                self.sockets.give_back(item, socket.into());
            }
            if let Some(endpoint) = p.quic {
                if !self.quic.contains_key(&cookie) {
                    self.sockets.release_udp(cookie);
                    endpoint.close(crate::tunnel::quic::code::DONE, b"not enrolled");
                }
            }
        }
    }

    /// Closes the QUIC endpoints of netns where no pod is enrolled any more; their open
    /// tunnels end with them.
    fn close_unused_endpoints(&mut self) {
        let enrolled: HashSet<u64> = self.pods.values().map(|p| p.netns_cookie).collect();
        let sockets = &self.sockets;
        self.quic.retain(|cookie, endpoint| {
            let keep = enrolled.contains(cookie);
            if !keep {
                endpoint.close(crate::tunnel::quic::code::DONE, b"the pod left the mesh");
                sockets.release_udp(*cookie);
                sockets.forget_quic(*cookie);
            }
            keep
        });
    }

    async fn prepare(&self, workload: Workload) -> Result<Prepared, EnrollError> {
        let id = workload.id.clone();
        let worker = NetnsWorker::spawn(&workload.netns).map_err(|source| EnrollError::Netns {
            workload: id.clone(),
            source,
        })?;
        let netns_err = |source| EnrollError::Netns {
            workload: id.clone(),
            source,
        };
        let listen_err = |addr, source| EnrollError::Listen {
            workload: id.clone(),
            addr,
            netns: workload.netns.display().to_string(),
            source,
        };
        let netns_cookie = worker
            .run(netns::current_netns_cookie)
            .await
            .map_err(netns_err)?
            .map_err(|e| listen_err(outbound::listen_addrs()[0], e))?;
        let mut listeners = Vec::new();
        let (tunnel_addrs, plaintext_addrs) = if self.tunnels {
            (
                inbound::listen_addrs().to_vec(),
                inbound::plaintext_listen_addrs().to_vec(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let addrs = outbound::listen_addrs()
            .into_iter()
            .map(|a| (Role::Outbound, a))
            .chain(tunnel_addrs.into_iter().map(|a| (Role::Tunnel, a)))
            .chain(plaintext_addrs.into_iter().map(|a| (Role::Plaintext, a)));
        for (role, addr) in addrs {
            // The old daemon's listener if it handed one over (its accept queue with it).
            let (bound, handed) = match self.sockets.take_tcp(netns_cookie, addr) {
                Some(l) => (Ok(l), true),
                None => (
                    worker
                        .run(move || proxy::bind_in_netns(addr))
                        .await
                        .map_err(netns_err)?,
                    false,
                ),
            };
            match bound {
                Ok(l) => {
                    let item = Item::Tcp { netns_cookie, addr };
                    let held = self.sockets.hold(item, l.as_fd());
                    listeners.push((role, l, handed));
                    if let Err(e) = held {
                        self.give_back(netns_cookie, listeners);
                        return Err(listen_err(addr, e));
                    }
                }
                // A pod without IPv6 still gets IPv4 capture and tunnels.
                Err(e) if addr.is_ipv6() && no_ipv6(&e) => {
                    tracing::warn!(workload = %id, %addr, "no IPv6 in the pod's netns; not listening on IPv6");
                }
                Err(source) => {
                    self.give_back(netns_cookie, listeners);
                    return Err(listen_err(addr, source));
                }
            }
        }
        match self.attach(&worker, &workload, netns_cookie).await {
            Ok((inbound, quic, pending_quic)) => {
                let ctx = Arc::new(PodContext {
                    workload: id,
                    netns: worker,
                    netns_cookie,
                    quic: quic.clone(),
                    load: Arc::default(),
                    shared: self.shared.clone(),
                    closing: CancellationToken::new(),
                    routes: OnceLock::new(),
                    plaintext_peers: Arc::default(),
                });
                Ok(Prepared {
                    ctx,
                    quic,
                    workload,
                    listeners,
                    inbound,
                    pending_quic,
                })
            }
            Err(e) => {
                self.give_back(netns_cookie, listeners);
                Err(e)
            }
        }
    }

    /// Files a pod's handed-over listeners back among the handed-over sockets, for the next
    /// try.
    fn give_back(&self, netns_cookie: u64, listeners: Vec<(Role, std::net::TcpListener, bool)>) {
        self.sockets.release_tcp(netns_cookie);
        for (_, listener, handed) in listeners {
            // One this daemon bound is closed: nothing else would ever take it.
            if !handed {
                continue;
            }
            if let Ok(addr) = listener.local_addr() {
                let item = Item::Tcp { netns_cookie, addr };
                self.sockets.give_back(item, listener.into());
            }
        }
    }

    /// The inbound program on the pod's interfaces and its QUIC endpoint (with the handed-over
    /// socket it moves to at takeover, if any).
    async fn attach(
        &self,
        worker: &NetnsWorker,
        workload: &Workload,
        netns_cookie: u64,
    ) -> Result<
        (
            Vec<Inbound>,
            Option<quinn::Endpoint>,
            Option<std::net::UdpSocket>,
        ),
        EnrollError,
    > {
        let id = workload.id.clone();
        let inbound = if self.tunnels {
            let capture = self.shared.capture.clone();
            let attached = worker
                .run(move || capture.attach_inbound(netns_cookie))
                .await
                .map_err(|source| EnrollError::Netns {
                    workload: id.clone(),
                    source,
                })?
                .map_err(|source| EnrollError::Capture {
                    workload: id.clone(),
                    source,
                })?;
            // A pod whose every interface cannot be policed is not enrolled.
            if let Some((name, why)) = attached.failed.first() {
                let done: Vec<u32> = attached.links.iter().map(|l| l.ifindex).collect();
                self.shared.capture.detach_inbound(netns_cookie, &done);
                return Err(EnrollError::Inbound {
                    workload: id,
                    interface: String::from_utf8_lossy(name).into_owned(),
                    reason: why.clone(),
                });
            }
            attached.links
        } else {
            Vec::new()
        };
        tracing::debug!(workload = %id, interfaces = ?inbound.iter().map(|i| &i.name).collect::<Vec<_>>(), "inbound program attached");
        if !self.tunnels {
            return Ok((inbound, None, None));
        }
        match self.quic_endpoint(worker, workload, netns_cookie).await {
            Ok((endpoint, pending)) => Ok((inbound, Some(endpoint), pending)),
            Err(e) => {
                let done: Vec<u32> = inbound.iter().map(|l| l.ifindex).collect();
                self.shared.capture.detach_inbound(netns_cookie, &done);
                Err(e)
            }
        }
    }

    /// The netns's endpoint: the one it already has, or one on a new UDP socket. Where the
    /// old daemon handed the pod's QUIC socket over, the endpoint starts on an ephemeral
    /// port and that socket comes back with it, to move to at takeover (the old daemon reads
    /// it until then).
    async fn quic_endpoint(
        &self,
        worker: &NetnsWorker,
        workload: &Workload,
        cookie: u64,
    ) -> Result<(quinn::Endpoint, Option<std::net::UdpSocket>), EnrollError> {
        if let Some(e) = self.quic.get(&cookie) {
            return Ok((e.clone(), None));
        }
        let listen_error = |source| EnrollError::ListenUdp {
            workload: workload.id.clone(),
            port: crate::tunnel::TUNNEL_PORT,
            netns: workload.netns.display().to_string(),
            source,
        };
        let handed = self.sockets.take_udp(cookie);
        let bind = if handed.is_some() {
            crate::tunnel::quic::bind_ephemeral_in_netns
        } else {
            crate::tunnel::quic::bind_in_netns
        };
        let socket = worker
            .run(bind)
            .await
            .map_err(|source| EnrollError::Netns {
                workload: workload.id.clone(),
                source,
            })?
            .map_err(listen_error)?;
        let item = Item::Udp {
            netns_cookie: cookie,
        };
        let tunnel_socket = handed.as_ref().map_or(socket.as_fd(), |h| h.as_fd());
        self.sockets
            .hold(item, tunnel_socket)
            .map_err(listen_error)?;
        match crate::tunnel::quic::endpoint(socket) {
            Ok(endpoint) => Ok((endpoint, handed)),
            Err(e) => {
                self.sockets.release_udp(cookie);
                if let Some(socket) = handed {
                    self.sockets.give_back(item, socket.into());
                }
                Err(listen_error(e))
            }
        }
    }

    /// Sets up the return routing of a pod that is being enrolled (see `transparent`), so that
    /// its application sees its clients' addresses. Where it cannot, connections come from
    /// the pod's own address, as the log and `mycel_enrolled_without_client_address` say; the
    /// pod is enrolled all the same.
    async fn route_replies(&self, p: &Prepared) {
        let id = &p.workload.id;
        if p.ctx.netns_cookie == self.own_netns {
            tracing::warn!(workload = %id, "the workload is in mesh-node's own netns: its application sees the node's own address, not its clients'");
            return;
        }
        match self.routes.enrol(p.ctx.netns_cookie, &p.ctx.netns).await {
            Ok(routes) => {
                let families = routes.families();
                tracing::debug!(workload = %id, ipv4 = families.v4, ipv6 = families.v6, "return routing in place");
                let _ = p.ctx.routes.set(routes);
            }
            Err(e) => {
                tracing::warn!(workload = %id, error = %e, "the pod's application will see connections from the pod's own address, not from their sources");
            }
        }
    }

    /// Enrolled pods whose applications see connections from their own pod address (their
    /// return routing could not be made).
    pub fn without_client_address(&self) -> usize {
        if !self.tunnels {
            return 0;
        }
        self.pods.values().filter(|p| !p.routed).count()
    }

    /// Takes the pod out of the mesh: its connects are no longer redirected, its interfaces
    /// no longer policed, its listeners close, its return routing goes.
    async fn stop(&self, pod: &Pod) {
        let flags = match self.shared.capture.unenroll(pod.netns_cookie) {
            Ok(flags) => flags,
            Err(e) => {
                tracing::error!(workload = %pod.workload.id, error = %e, "cannot remove enrollment");
                0
            }
        };
        self.sockets.release_tcp(pod.netns_cookie);
        self.close(pod);
        if self.tunnels {
            // Awaited: the same netns may be enrolled again at once (under another name), and
            // its new routing must not be removed after it was made.
            self.routes.leave(pod.netns_cookie, flags).await;
        }
    }

    /// Closes the pod's listeners and stops its tasks; the kernel keeps capturing it.
    fn close(&self, pod: &Pod) {
        self.local.remove(&pod.workload.id);
        pod.shutdown.cancel();
    }

    /// Closes the listeners, then waits up to `drain` for open connections. The pods stay
    /// enrolled in the kernel: until the next daemon takes over, their connects are refused
    /// rather than sent around the mesh.
    pub async fn shutdown(&mut self, drain: Duration) {
        self.stop_accepting();
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            tracing::info!(open, "draining connections");
        }
        if tokio::time::timeout(drain, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.connections.len(),
                "drain timeout reached; closing remaining connections"
            );
        }
        // Idle tunnel sessions being ended in order finish first (each within seconds).
        self.shared.tunnels.retired().await;
        // Peers learn at once that the QUIC connections are gone, instead of after their
        // idle timeout: the close frames must leave before the process does.
        let closing: Vec<_> = self.quic.values().cloned().collect();
        self.close_unused_endpoints();
        let flushed = wait_idle(closing);
        if tokio::time::timeout(QUIC_CLOSE_WAIT, flushed)
            .await
            .is_err()
        {
            tracing::debug!("QUIC endpoints still closing; exiting anyway");
        }
    }
}

impl Enroller {
    /// Stops accepting on every pod's listeners (still open in a daemon that took over, with
    /// their queues); the kernel keeps capturing the pods and open connections carry on.
    pub fn stop_accepting(&mut self) {
        for pod in std::mem::take(&mut self.pods).into_values() {
            self.close(&pod);
        }
        // Idle tunnel sessions end in order now, and those that come back later too: their
        // destinations see them closed rather than cut when this daemon exits.
        self.shared.tunnels.close();
    }

    /// For a handoff: closes every QUIC connection (peers open new ones, to the new daemon),
    /// waits up to a second for the close frames to leave, then stops reading the pods' QUIC
    /// sockets, which the new daemon reads from now on. How many connections were open.
    pub async fn close_quic_for_handoff(&mut self) -> u64 {
        let endpoints: Vec<quinn::Endpoint> = self.quic.drain().map(|(_, e)| e).collect();
        let open = endpoints.iter().map(|e| e.open_connections() as u64).sum();
        for e in &endpoints {
            e.close(
                crate::tunnel::quic::code::RESTART,
                b"the node's daemon is being replaced",
            );
        }
        let _ = tokio::time::timeout(QUIC_CLOSE_WAIT, wait_idle(endpoints.clone())).await;
        // The endpoints live on in the pods' contexts, which open connections hold, and an
        // endpoint reads its socket for as long as it lives (its previous one too, until a
        // packet arrives on the current one). Moving each twice to a socket of its own
        // leaves it no reference to the pod's socket.
        for e in &endpoints {
            for _ in 0..2 {
                match std::net::UdpSocket::bind(("127.0.0.1", 0)).and_then(|s| {
                    s.set_nonblocking(true)?;
                    e.rebind(s)
                }) {
                    Ok(()) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot move a closed QUIC endpoint off its pod's socket")
                    }
                }
            }
        }
        open
    }
}

/// How long shutdown waits for the QUIC endpoints to send their close frames.
const QUIC_CLOSE_WAIT: Duration = Duration::from_secs(1);

async fn wait_idle(endpoints: Vec<quinn::Endpoint>) {
    for endpoint in endpoints {
        endpoint.wait_idle().await;
    }
}

fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
    )
}
