//! The QUIC transport (quinn): one QUIC connection per pair of pods, one bidirectional stream
//! per application connection, carrying the same header as a TLS tunnel and then its bytes.
//!
//! Each enrolled pod has one UDP endpoint on :15008 in its netns, which both accepts tunnels
//! to the pod and opens the pod's tunnels to other nodes, so a tunnel's UDP source address is
//! the source pod's, as a TLS tunnel's TCP source is. The handshake is TLS 1.3 with the same
//! SPIFFE checks as the TLS transport (`tls.rs`): the client requires the destination's
//! expected identity, the server requires a client certificate of the mesh.
//!
//! [`Connections`] keeps the source side's connections, keyed like the TLS session pool, and
//! drops each one from the pool after [`pool::IDLE`] without streams or [`pool::MAX_AGE`]
//! after its handshake; a dropped connection closes once its last stream has ended.

use std::{
    collections::HashMap,
    io,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use quinn::{
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    Connection, Endpoint, EndpointConfig, RecvStream, SendStream, TransportConfig, VarInt,
};
use rustls::pki_types::CertificateDer;

use tokio_util::sync::CancellationToken;

use super::{anchors::Anchors, pool, TlsConfigs, TUNNEL_PORT};
use crate::metrics::{tunnels::Direction, OpenTunnel, TunnelMetrics};

/// Streams one connection may have open at once. quinn reserves an entry for each stream
/// the peer may open, so this is not unbounded; past it, the pool opens another connection.
pub const MAX_STREAMS: u32 = 4096;
/// Flow-control windows, from `cargo xtask bench` (see the crate README): per stream enough
/// for one bulk transfer at full speed between two nodes, per connection room for several.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const SEND_WINDOW: u64 = 16 << 20;
/// Socket buffers of each pod's endpoint: a burst of GSO batches must not overflow them.
const SOCKET_BUFFER: usize = 4 << 20;
/// With streams open, the source keeps an idle connection alive (an application connection
/// may be silent for hours, as over TCP); the server gives up on a silent peer after
/// [`IDLE_TIMEOUT`].
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the pool looks at each connection's use.
const SWEEP: Duration = Duration::from_secs(5);
/// The reason a source gives when it closes a connection whose destination's root was withdrawn.
const WITHDRAWN: &[u8] = b"trust root withdrawn";

/// Stream and connection error codes on the wire.
pub mod code {
    use quinn::VarInt;
    /// The connection or stream is no longer needed.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// The other side of the relay failed or was reset: passed on as a reset.
    pub const RESET: VarInt = VarInt::from_u32(1);
    /// The node's daemon is being replaced; a new connection goes to the new one.
    pub const RESTART: VarInt = VarInt::from_u32(2);
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("this pod has no QUIC endpoint")]
    NoEndpoint,
    #[error("cannot use the TLS configuration for QUIC: {0}")]
    Config(String),
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the destination chains to a trust root that was withdrawn")]
    TrustWithdrawn,
}

/// The transport settings both sides use.
fn transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        .keep_alive_interval(Some(KEEP_ALIVE))
        // The nodes are on one network: start from a LAN's round trip, not the Internet's
        // 333 ms, so that a lost first packet is resent in milliseconds.
        .initial_rtt(Duration::from_millis(10));
    if let Ok(timeout) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(timeout));
    }
    t
}

/// A client configuration from the tunnel's rustls one (same identities and checks).
pub fn client_config(tls: Arc<rustls::ClientConfig>) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// A server configuration from the tunnel's rustls one.
pub fn server_config(tls: Arc<rustls::ServerConfig>) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    // Sources are pods of the mesh on known addresses; a retry round trip would only slow
    // every new connection down.
    config.migration(false);
    Ok(config)
}

/// The pod's UDP socket on :15008, dual-stack where the netns has IPv6. Call on the pod's
/// netns thread.
pub fn bind_in_netns() -> io::Result<std::net::UdpSocket> {
    bind_port_in_netns(TUNNEL_PORT)
}

/// A QUIC socket on an ephemeral port of the calling thread's netns: where a daemon that is
/// taking over runs a pod's QUIC endpoint until the old daemon lets go of the pod's
/// [`TUNNEL_PORT`] socket (then the endpoint moves there, `Endpoint::rebind`).
pub fn bind_ephemeral_in_netns() -> io::Result<std::net::UdpSocket> {
    bind_port_in_netns(0)
}

fn bind_port_in_netns(port: u16) -> io::Result<std::net::UdpSocket> {
    let dual = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = match udp_socket(dual, true) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            udp_socket(SocketAddr::from(([0, 0, 0, 0], port)), false)?
        }
        Err(e) => return Err(e),
    };
    Ok(socket.into())
}

fn udp_socket(addr: SocketAddr, dual: bool) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if dual {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    force_buffers(&socket);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Sets both socket buffers to [`SOCKET_BUFFER`], above `net.core.[rw]mem_max` (the daemon
/// has CAP_NET_ADMIN); the kernel's limits apply if that is refused.
fn force_buffers(socket: &socket2::Socket) {
    use std::os::fd::AsRawFd as _;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: a valid fd and a c_int option value of the right size.
        let set = |opt| unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// A quinn endpoint over `socket`, with no server configuration yet (incoming connections are
/// refused until [`Endpoint::set_server_config`]). Needs the runtime.
pub fn endpoint(socket: std::net::UdpSocket) -> io::Result<Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime for the QUIC endpoint"))?;
    Endpoint::new(EndpointConfig::default(), None, socket, runtime)
}

/// The verified certificate chain of the peer of an established connection.
pub fn peer_certificates(conn: &Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
        .unwrap_or_default()
}

/// One tunnelled connection: a bidirectional stream, and what was read past its header.
pub struct TunnelStream {
    pub send: SendStream,
    pub recv: RecvStream,
    /// Application bytes that arrived with the header; they go first.
    pub early: Vec<u8>,
    /// On the source side: cancelled when the root the destination's chain ends at is
    /// withdrawn, which ends the relay (see [`crate::tunnel::anchors`]).
    pub withdrawn: Option<CancellationToken>,
    _use: Option<StreamUse>,
}

impl TunnelStream {
    pub fn new(send: SendStream, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            early: Vec::new(),
            withdrawn: None,
            _use: None,
        }
    }

    /// Resets both directions, as a TCP reset would.
    pub fn reset(mut self) {
        let _ = self.send.reset(code::RESET);
        let _ = self.recv.stop(code::RESET);
    }
}

/// Counts a pooled connection's open streams, for the idle check.
struct StreamUse(Arc<Usage>);

impl Drop for StreamUse {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Usage {
    opened: Instant,
    /// Counts the connection among the open tunnels until the pool and its last stream let
    /// go of it, which is when quinn closes it.
    tunnel: OpenTunnel,
    open: AtomicUsize,
    /// Milliseconds after `opened` when the last stream ended.
    idle_since: AtomicU64,
}

impl Usage {
    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the pool should let go of the connection.
    fn expired(&self) -> bool {
        let idle = self
            .now()
            .saturating_sub(self.idle_since.load(Ordering::Relaxed));
        self.opened.elapsed() >= pool::MAX_AGE
            || (self.open.load(Ordering::Relaxed) == 0 && Duration::from_millis(idle) >= pool::IDLE)
    }
}

struct Live {
    conn: Connection,
    usage: Arc<Usage>,
    /// Cancelled when the destination's root is withdrawn: no new stream goes on it.
    withdrawn: CancellationToken,
}

type Slot = Arc<tokio::sync::Mutex<Option<Live>>>;

/// What [`Connections::open`] needs to make a new connection.
pub struct Dial<'a> {
    pub endpoint: &'a Endpoint,
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub metrics: &'a TunnelMetrics,
    /// The bundle `tls` was made from and the roots in force, to watch the destination's.
    pub trust: &'a TlsConfigs,
    pub anchors: &'a Anchors,
}

/// The source side's connections, shared by every pod of the node.
#[derive(Default, Clone)]
pub struct Connections {
    slots: Arc<Mutex<HashMap<pool::Key, Slot>>>,
}

impl Connections {
    /// Closes every pooled connection: they were made from sockets the endpoints no longer
    /// use (a daemon taking over dials from an ephemeral port until the old one lets go of the
    /// tunnel port, and destinations do not follow a client that moves). The next stream to
    /// each destination opens a new one.
    pub async fn close_all(&self, reason: &'static [u8]) -> usize {
        let slots: Vec<Slot> = {
            let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            map.drain().map(|(_, slot)| slot).collect()
        };
        let mut closed = 0;
        for slot in slots {
            if let Some(live) = slot.lock().await.take() {
                live.conn.close(code::DONE, reason);
                closed += 1;
            }
        }
        closed
    }

    /// A new stream to `key`'s destination, on the pooled connection when there is a usable
    /// one and `fresh` is false, else on a new connection that the pool keeps from then on.
    /// Returns whether it made a new one. The caller bounds the time.
    pub async fn open(
        &self,
        key: &pool::Key,
        dial: Dial<'_>,
        fresh: bool,
    ) -> Result<(TunnelStream, bool), QuicError> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // Held across the handshake, so that a burst of connections to a new destination
        // makes one QUIC connection, not one each.
        let mut live = slot.lock().await;
        let pooled = live.as_ref().filter(|l| {
            !fresh
                && l.conn.close_reason().is_none()
                && !l.withdrawn.is_cancelled()
                && l.usage.opened.elapsed() < pool::MAX_AGE
                && l.usage.open.load(Ordering::Relaxed) < MAX_STREAMS as usize
        });
        let (conn, usage, withdrawn, made) = match pooled {
            Some(l) => (l.conn.clone(), l.usage.clone(), l.withdrawn.clone(), false),
            None => {
                // A connection to a withdrawn root goes now, not at the sweep, with its streams.
                if let Some(old) = live.as_ref().filter(|l| l.withdrawn.is_cancelled()) {
                    old.conn.close(code::DONE, WITHDRAWN);
                }
                let config = client_config(dial.tls)?;
                let name = dial.addr.ip().to_string();
                let conn = dial
                    .endpoint
                    .connect_with(config, dial.addr, &name)?
                    .await?;
                let usage = Arc::new(Usage {
                    opened: Instant::now(),
                    tunnel: dial
                        .metrics
                        .opened(Direction::Out, mesh_model::Transport::Quic),
                    open: AtomicUsize::new(0),
                    idle_since: AtomicU64::new(0),
                });
                let chain = peer_certificates(&conn);
                let withdrawn = dial.anchors.watch_chain(&chain, dial.trust);
                drop(chain);
                if withdrawn.is_cancelled() {
                    conn.close(code::DONE, WITHDRAWN);
                    return Err(QuicError::TrustWithdrawn);
                }
                self.watch(
                    key.clone(),
                    conn.stable_id(),
                    usage.clone(),
                    withdrawn.clone(),
                );
                *live = Some(Live {
                    conn: conn.clone(),
                    usage: usage.clone(),
                    withdrawn: withdrawn.clone(),
                });
                (conn, usage, withdrawn, true)
            }
        };
        usage.open.fetch_add(1, Ordering::Relaxed);
        let guard = StreamUse(usage);
        drop(live);
        let (send, recv) = conn.open_bi().await?;
        guard.0.tunnel.stream();
        let mut stream = TunnelStream::new(send, recv);
        stream._use = Some(guard);
        stream.withdrawn = Some(withdrawn);
        Ok((stream, made))
    }

    /// Lets go of the connection `id` under `key` once it is idle, too old or closed, and
    /// closes it (with every stream on it) once its destination's root is `withdrawn`.
    fn watch(&self, key: pool::Key, id: usize, usage: Arc<Usage>, withdrawn: CancellationToken) {
        let slots = Arc::downgrade(&self.slots);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(SWEEP) => {}
                    () = withdrawn.cancelled() => {}
                }
                let Some(slots) = slots.upgrade() else { return };
                let Some(slot) = slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .cloned()
                else {
                    return;
                };
                let mut live = slot.lock().await;
                let Some(l) = live.as_ref().filter(|l| l.conn.stable_id() == id) else {
                    // Replaced: the old connection closes with its last stream.
                    return;
                };
                if withdrawn.is_cancelled() {
                    l.conn.close(code::DONE, WITHDRAWN);
                } else if l.conn.close_reason().is_none() && !usage.expired() {
                    continue;
                }
                // Dropping the pool's handle closes the connection once no stream holds it.
                *live = None;
                drop(live);
                let mut map = slots.lock().unwrap_or_else(|p| p.into_inner());
                // Two holders, the map and `slot` here: nobody is opening a stream on it.
                if map.get(&key).is_some_and(|s| Arc::strong_count(s) == 2) {
                    map.remove(&key);
                }
                return;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::tls::{
        self, anchor_id,
        tests::{ca, svid, trust, A, B},
    };

    /// B's server and A's client configuration (A dials B), and the trust they were made
    /// with.
    fn configs(
        ca: &tls::tests::Ca,
    ) -> (
        tls::Trust,
        Arc<rustls::ServerConfig>,
        Arc<rustls::ClientConfig>,
    ) {
        let t = trust(ca);
        let server = Arc::new(tls::server_config(svid(ca, B, -60, 3600), &t).unwrap());
        let client =
            Arc::new(tls::client_config(svid(ca, A, -60, 3600), &t, B.parse().unwrap()).unwrap());
        (t, server, client)
    }

    /// The handoff moves QUIC sockets between endpoints (`enroll.rs`): the old daemon's
    /// endpoints close and move off their sockets twice, then the new daemon's endpoints move
    /// onto them. Both ends of a connection must work afterwards: a server endpoint moved onto
    /// the old server's socket accepts, a client endpoint moved onto the old client's socket
    /// connects.
    #[tokio::test]
    async fn endpoints_moved_onto_a_closed_endpoints_socket_work() {
        let ca = ca();
        let (_, server_tls, client_tls) = configs(&ca);
        let bind = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        };
        let serve = |e: &Endpoint| {
            e.set_server_config(Some(server_config(server_tls.clone()).unwrap()));
            let accepting = e.clone();
            tokio::spawn(async move {
                while let Some(incoming) = accepting.accept().await {
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            let mut buf = [0u8; 4];
                            if recv.read_exact(&mut buf).await.is_ok() {
                                let _ = send.write_all(&buf).await;
                                let _ = send.finish();
                            }
                        }
                    });
                }
            });
        };
        let ping = |client: Endpoint, addr| {
            let cfg = client_config(client_tls.clone()).unwrap();
            async move {
                let conn = tokio::time::timeout(Duration::from_secs(5), async {
                    client
                        .connect_with(cfg, addr, "server")
                        .map_err(io::Error::other)?
                        .await
                        .map_err(io::Error::other)
                })
                .await
                .map_err(|_| io::Error::other("no handshake within 5 s"))??;
                let (mut send, mut recv) = conn.open_bi().await.map_err(io::Error::other)?;
                send.write_all(b"ping").await.map_err(io::Error::other)?;
                let mut buf = [0u8; 4];
                tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut buf))
                    .await
                    .map_err(|_| io::Error::other("no echo within 5 s"))?
                    .map_err(io::Error::other)?;
                conn.close(code::DONE, b"");
                Ok::<_, io::Error>(buf)
            }
        };
        let retire = |e: &Endpoint| {
            e.close(code::RESTART, b"restart");
            for _ in 0..2 {
                e.rebind(bind()).unwrap();
            }
        };

        let (server_socket, client_socket) = (bind(), bind());
        let addr = server_socket.local_addr().unwrap();
        let old_server = endpoint(server_socket.try_clone().unwrap()).unwrap();
        serve(&old_server);
        let old_client = endpoint(client_socket.try_clone().unwrap()).unwrap();
        assert_eq!(&ping(old_client.clone(), addr).await.unwrap(), b"ping");

        // The new daemon's endpoints, on ephemeral ports until the old ones let go; its
        // client has a connection open to the old server meanwhile.
        let new_server = endpoint(bind()).unwrap();
        serve(&new_server);
        let new_client = endpoint(bind()).unwrap();
        // Another node's server, which stays.
        let other = endpoint(bind()).unwrap();
        serve(&other);
        let other_addr = other.local_addr().unwrap();
        let cfg = client_config(client_tls.clone()).unwrap();
        let early = new_client
            .connect_with(cfg, other_addr, "server")
            .unwrap()
            .await
            .unwrap();
        retire(&old_server);
        retire(&old_client);
        new_server.rebind(server_socket).unwrap();
        new_client.rebind(client_socket).unwrap();
        // A connection made before the move does not follow it (destinations do not take a
        // client that moves): it times out, which is why the pool is closed at takeover
        // (`Connections::close_all`). One made after it works.
        let stream = async {
            let (mut send, mut recv) = early.open_bi().await.map_err(io::Error::other)?;
            send.write_all(b"pong").await.map_err(io::Error::other)?;
            let mut buf = [0u8; 4];
            recv.read_exact(&mut buf).await.map_err(io::Error::other)?;
            Ok::<_, io::Error>(buf)
        };
        let echoed = tokio::time::timeout(Duration::from_millis(500), stream).await;
        assert!(
            echoed.is_err(),
            "migration is off at the server: {echoed:?}"
        );
        early.close(code::DONE, b"");
        assert_eq!(
            &ping(new_client.clone(), other_addr).await.unwrap(),
            b"ping"
        );
        assert_eq!(&ping(new_client.clone(), addr).await.unwrap(), b"ping");
        // And a client elsewhere reaches the moved server.
        assert_eq!(
            &ping(endpoint(bind()).unwrap(), addr).await.unwrap(),
            b"ping"
        );
        drop((old_server, old_client));
    }

    /// The source's end of the trust watch over QUIC: the pooled connection to a destination
    /// whose root is withdrawn is closed with the streams it carries, and the next stream goes
    /// on a new connection.
    #[tokio::test]
    async fn a_connection_to_a_withdrawn_root_is_closed() {
        let ca = ca();
        let (t, server_tls, client_tls) = configs(&ca);
        let bundle = TlsConfigs::new(t, Arc::new(crate::identity::SvidStore::default()));
        let anchors = Anchors::default();
        anchors.keep_only([anchor_id(&ca.root)].into());

        let bind = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = endpoint(bind()).unwrap();
        server.set_server_config(Some(server_config(server_tls).unwrap()));
        let addr = server.local_addr().unwrap();
        // Answers every stream's first bytes, and reports how each connection closed.
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let mut buf = [0u8; 4];
                        if recv.read_exact(&mut buf).await.is_ok() {
                            let _ = send.write_all(&buf).await;
                        }
                        tokio::spawn(async move {
                            let _keep = (send, recv);
                            std::future::pending::<()>().await;
                        });
                    }
                    let _ = closed_tx.send(conn.close_reason());
                });
            }
        });

        let client = endpoint(bind()).unwrap();
        let registry = prometheus::Registry::new();
        let metrics = TunnelMetrics::register(&registry).unwrap();
        let key = pool::Key {
            source: crate::workloads::WorkloadId::new("default", "a"),
            source_serial: "1".into(),
            destination: addr,
            identity: B.parse().unwrap(),
            trust: bundle.trust_fingerprint(),
        };
        let connections = Connections::default();
        let open = || {
            let dial = Dial {
                endpoint: &client,
                addr,
                tls: client_tls.clone(),
                metrics: &metrics,
                trust: &bundle,
                anchors: &anchors,
            };
            connections.open(&key, dial, false)
        };
        let (mut first, made) = open().await.unwrap();
        assert!(made);
        first.send.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        first.recv.read_exact(&mut echo).await.unwrap();
        let (_second, made) = open().await.unwrap();
        assert!(!made, "the second stream shares the connection");

        anchors.keep_only(std::collections::HashSet::new());
        assert!(first.withdrawn.as_ref().is_some_and(|w| w.is_cancelled()));
        let reason = tokio::time::timeout(Duration::from_secs(5), closed.recv())
            .await
            .expect("the connection outlived its root")
            .expect("a close reason");
        assert!(
            matches!(&reason, Some(quinn::ConnectionError::ApplicationClosed(c)) if &c.reason[..] == b"trust root withdrawn"),
            "{reason:?}"
        );
        assert!(
            first.recv.read_exact(&mut echo).await.is_err(),
            "a stream of the closed connection still reads"
        );
        // A handshake to the withdrawn root that completes now is closed before any stream.
        assert!(
            matches!(open().await, Err(QuicError::TrustWithdrawn)),
            "a stream went to the withdrawn root"
        );
    }
}
