//! The proxy's socket toward a pod's application, made so that the application sees the
//! connection come from its source's address, and the source ports it must not take.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use super::MARK;

/// A TCP socket for a connection to `dst` that the application will see coming from
/// `source`: transparent, marked, bound to `source`; call it on the pod's netns thread. The
/// port is left to `connect` (`IP_BIND_ADDRESS_NO_PORT`: unique per destination, so sources
/// do not run out of ports across an application's ports), unless `peers` holds plaintext
/// connections, whose address pairs a port must not repeat: then it is bound here and
/// checked.
pub fn socket_from(
    source: IpAddr,
    dst: SocketAddr,
    peers: &PlaintextPeers,
) -> io::Result<socket2::Socket> {
    /// Ports tried before giving up; each repeat is a chance of about one in the number of
    /// plaintext connections the pod holds from that address, out of some 28,000.
    const TRIES: usize = 8;
    for _ in 0..TRIES {
        let socket = crate::netns::tcp_socket(dst)?;
        if dst.is_ipv6() {
            socket.set_ip_transparent_v6(true)?;
        } else {
            socket.set_ip_transparent_v4(true)?;
        }
        socket.set_mark(MARK)?;
        let check = peers.any();
        if !check {
            bind_address_no_port(&socket)?;
        }
        socket.bind(&SocketAddr::new(source, 0).into())?;
        if !check {
            return Ok(socket);
        }
        let bound = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound socket without an IP address"))?;
        if !peers.holds(bound, dst) {
            return Ok(socket);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free source port for {source} toward {dst}"),
    ))
}

/// `IP_BIND_ADDRESS_NO_PORT` (both families): `bind` takes the address only, `connect` picks
/// the port, unique for the whole 4-tuple rather than for the address alone.
fn bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a live stack value of that size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The source address a connection to `dst` can be made transparent from: `source` itself
/// when it is of `dst`'s family (v4-mapped counts as v4) and one that may appear on the wire
/// of a pod's network: not loopback, unspecified, multicast, broadcast, `0.0.0.0/8` or IPv6
/// link-local (which needs an interface to bind).
pub fn usable_source(source: IpAddr, dst: SocketAddr) -> Option<IpAddr> {
    let source = source.to_canonical();
    let routable = match source {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || v6.is_unicast_link_local())
        }
    };
    (routable && source.is_ipv4() == dst.is_ipv4()).then_some(source)
}

/// The address pairs of the plaintext connections a pod holds (PERMISSIVE mode). Such a
/// connection's socket in the pod's netns has the client's address and port as its peer and
/// the application's as its own, which is exactly the pair the application's side of a
/// transparent connection from that client's address would have: a transparent connection
/// must not pick one of those ports as its source port, or the two sockets would take each
/// other's packets. A multiset: the same pair can be held twice for a moment (a client that
/// reuses its port as the first connection ends).
#[derive(Default)]
pub struct PlaintextPeers {
    held: Mutex<HashMap<(SocketAddr, SocketAddr), usize>>,
    /// How many are held: a pod with none (a meshed pod, mostly) skips the lock.
    count: AtomicUsize,
}

impl PlaintextPeers {
    /// Holds `(peer, local)` until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, peer: SocketAddr, local: SocketAddr) -> PeerHold {
        let pair = (canonical(peer), canonical(local));
        *self.lock().entry(pair).or_default() += 1;
        self.count.fetch_add(1, Ordering::Relaxed);
        PeerHold {
            peers: self.clone(),
            pair,
        }
    }

    /// Whether any plaintext connection is held.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Whether a plaintext connection from `peer` to `local` is held.
    pub fn holds(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        self.any()
            && self
                .lock()
                .contains_key(&(canonical(peer), canonical(local)))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A plaintext connection's pair, held for as long as the connection lives.
pub struct PeerHold {
    peers: Arc<PlaintextPeers>,
    pair: (SocketAddr, SocketAddr),
}

impl Drop for PeerHold {
    fn drop(&mut self) {
        let mut held = self.peers.lock();
        if let Some(n) = held.get_mut(&self.pair) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.pair);
            }
            self.peers.count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use super::{usable_source, PlaintextPeers};

    #[test]
    fn only_a_routable_source_of_the_same_family_is_used() {
        let v4: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:80".parse().unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(usable_source(ip("10.0.0.1"), v4), Some(ip("10.0.0.1")));
        assert_eq!(
            usable_source(ip("::ffff:10.0.0.1"), v4),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(usable_source(ip("fd00::1"), v6), Some(ip("fd00::1")));
        for (source, dst) in [
            ("fd00::1", v4),
            ("10.0.0.1", v6),
            ("127.0.0.1", v4),
            ("0.0.0.0", v4),
            ("0.1.2.3", v4),
            ("224.0.0.1", v4),
            ("255.255.255.255", v4),
            ("169.254.1.1", v4),
            ("::1", v6),
            ("::", v6),
            ("fe80::1", v6),
            ("ff02::1", v6),
        ] {
            assert_eq!(usable_source(ip(source), dst), None, "{source}");
        }
    }

    #[test]
    fn a_pair_held_twice_stays_held_until_both_let_go() {
        let peers = Arc::new(PlaintextPeers::default());
        let (client, app): (SocketAddr, SocketAddr) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        assert!(!peers.any());
        let first = peers.hold(client, app);
        let second = peers.hold("[::ffff:10.0.0.1]:40000".parse().unwrap(), app);
        drop(first);
        assert!(peers.holds(client, app), "still held by the second");
        assert!(!peers.holds("10.0.0.1:40001".parse().unwrap(), app));
        drop(second);
        assert!(!peers.holds(client, app));
        assert!(!peers.any());
    }
}
