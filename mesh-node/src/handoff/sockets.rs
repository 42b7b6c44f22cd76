//! The descriptors of a handoff: those this daemon would hand over (each listener, held as a
//! duplicate from the moment it is bound until it is closed), and those handed to it, checked
//! against their labels before they are used and closed if nothing takes them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::Mutex,
};

use nix::sys::socket::{self, sockopt, SockType, SockaddrLike as _};

use super::protocol::Item;

#[derive(Default)]
pub struct Sockets {
    held: Mutex<HashMap<Item, OwnedFd>>,
    handed: Mutex<HashMap<Item, OwnedFd>>,
    /// Pods' QUIC endpoints running on an ephemeral port until the old daemon lets go of
    /// their handed-over sockets, by netns cookie.
    deferred_quic: Mutex<HashMap<u64, (quinn::Endpoint, std::net::UdpSocket)>>,
    /// Set once the old daemon let go of the QUIC sockets: one handed over and taken after
    /// that (a pod enrolled late) is moved to at once.
    quic_released: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sockets {
    /// Keeps a duplicate of `fd` to hand over as `item`.
    pub fn hold(&self, item: Item, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let dup = fd.try_clone_to_owned()?;
        lock(&self.held).insert(item, dup);
        Ok(())
    }

    /// Lets go of the pod's TCP listeners (it left the mesh: they are closed).
    pub fn release_tcp(&self, netns_cookie: u64) {
        lock(&self.held).retain(
            |item, _| !matches!(item, Item::Tcp { netns_cookie: c, .. } if *c == netns_cookie),
        );
    }

    /// Lets go of the pod's QUIC socket (its endpoint closed).
    pub fn release_udp(&self, netns_cookie: u64) {
        lock(&self.held).remove(&Item::Udp { netns_cookie });
    }

    /// Files `fd` back among the handed-over descriptors (a start that could not use it yet).
    pub fn give_back(&self, item: Item, fd: OwnedFd) {
        lock(&self.handed).insert(item, fd);
    }

    /// Lets go of every socket held for a handoff: this daemon has been taken over, and its
    /// duplicates would keep listening sockets open with nobody accepting on them.
    pub fn clear_held(&self) {
        lock(&self.held).clear();
    }

    /// What this daemon would hand over, as duplicates, in a stable order (the lock first).
    pub fn held(&self) -> std::io::Result<Vec<(Item, OwnedFd)>> {
        let held = lock(&self.held);
        let mut out = Vec::with_capacity(held.len());
        for (item, fd) in held.iter() {
            out.push((*item, fd.try_clone()?));
        }
        out.sort_by_key(|(item, _)| order(item));
        Ok(out)
    }

    /// Files what the old daemon handed over, each checked against its label; returns why
    /// each refused one was refused (it is closed).
    pub fn receive(&self, items: Vec<Item>, fds: Vec<OwnedFd>) -> Vec<String> {
        let mut refused = Vec::new();
        let mut handed = lock(&self.handed);
        for (item, fd) in items.into_iter().zip(fds) {
            match check(&item, fd.as_fd()) {
                Ok(()) => {
                    handed.insert(item, fd);
                }
                Err(why) => refused.push(format!("{item:?}: {why}")),
            }
        }
        refused
    }

    /// The handed-over descriptor for `item`, if there is one.
    pub fn take(&self, item: &Item) -> Option<OwnedFd> {
        lock(&self.handed).remove(item)
    }

    /// A pod's handed-over TCP listener on `addr`.
    pub fn take_tcp(&self, netns_cookie: u64, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(&Item::Tcp { netns_cookie, addr })
            .map(std::net::TcpListener::from)
    }

    /// A pod's handed-over QUIC socket.
    pub fn take_udp(&self, netns_cookie: u64) -> Option<std::net::UdpSocket> {
        self.take(&Item::Udp { netns_cookie })
            .map(std::net::UdpSocket::from)
    }

    /// A handed-over TCP listener (admin, metrics) if it listens on `addr`; else it is
    /// closed (the operator changed the address).
    pub fn take_listener(&self, item: Item, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let l = std::net::TcpListener::from(self.take(&item)?);
        (l.local_addr().ok() == Some(addr)).then_some(l)
    }

    /// Keeps the pod's handed-over QUIC socket for its endpoint, until [`Sockets::rebind_quic`].
    pub fn defer_quic(
        &self,
        netns_cookie: u64,
        endpoint: quinn::Endpoint,
        socket: std::net::UdpSocket,
    ) {
        let mut deferred = lock(&self.deferred_quic);
        if self
            .quic_released
            .load(std::sync::atomic::Ordering::Acquire)
        {
            if let Err(e) = endpoint.rebind(socket) {
                tracing::error!(cookie = netns_cookie, error = %e, "cannot move a pod's QUIC endpoint to its tunnel port");
            }
            return;
        }
        deferred.insert(netns_cookie, (endpoint, socket));
    }

    /// The pod's endpoint closed: its socket is not moved to.
    pub fn forget_quic(&self, netns_cookie: u64) {
        lock(&self.deferred_quic).remove(&netns_cookie);
    }

    /// The old daemon no longer reads the QUIC sockets: each endpoint moves to its pod's;
    /// how many did.
    pub fn rebind_quic(&self) -> usize {
        let mut moved = 0;
        let mut deferred = lock(&self.deferred_quic);
        self.quic_released
            .store(true, std::sync::atomic::Ordering::Release);
        for (cookie, (endpoint, socket)) in deferred.drain() {
            match endpoint.rebind(socket) {
                Ok(()) => moved += 1,
                Err(e) => {
                    tracing::error!(cookie, error = %e, "cannot move a pod's QUIC endpoint to its tunnel port")
                }
            }
        }
        moved
    }

    /// Closes what was handed over and not taken (pods that left meanwhile); how many.
    pub fn close_untaken(&self) -> usize {
        let mut handed = lock(&self.handed);
        let n = handed.len();
        handed.clear();
        n
    }
}

/// The lock first (whoever has it owns the cgroup), then the endpoints, then the pods.
fn order(item: &Item) -> u8 {
    match item {
        Item::Lock => 0,
        Item::Admin | Item::Metrics | Item::Cni => 1,
        Item::Tcp { .. } | Item::Udp { .. } => 2,
    }
}

/// Whether `fd` is what `item` says it is.
fn check(item: &Item, fd: BorrowedFd<'_>) -> Result<(), String> {
    let err = |e: nix::Error| e.to_string();
    let is_socket = |ty: SockType, listening: bool| -> Result<(), String> {
        let got = socket::getsockopt(&fd, sockopt::SockType).map_err(err)?;
        if got != ty {
            return Err(format!("a {got:?} socket"));
        }
        if listening && !socket::getsockopt(&fd, sockopt::AcceptConn).map_err(err)? {
            return Err("not listening".into());
        }
        Ok(())
    };
    let in_netns = |cookie: u64| -> Result<(), String> {
        let got = crate::netns::socket_netns_cookie(&fd.as_raw_fd()).map_err(|e| e.to_string())?;
        if got != cookie {
            return Err(format!("in netns {got}, not {cookie}"));
        }
        Ok(())
    };
    match item {
        Item::Lock => {
            let st = nix::sys::stat::fstat(fd).map_err(err)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err("not a regular file".into());
            }
            Ok(())
        }
        Item::Admin | Item::Metrics => is_socket(SockType::Stream, true),
        Item::Cni => {
            is_socket(SockType::Stream, true)?;
            let family = socket::getsockname::<socket::SockaddrStorage>(fd.as_raw_fd())
                .map_err(err)?
                .family();
            if family != Some(socket::AddressFamily::Unix) {
                return Err("not a Unix socket".into());
            }
            Ok(())
        }
        Item::Tcp { netns_cookie, addr } => {
            is_socket(SockType::Stream, true)?;
            in_netns(*netns_cookie)?;
            let local =
                std::net::TcpListener::from(fd.try_clone_to_owned().map_err(|e| e.to_string())?)
                    .local_addr()
                    .map_err(|e| e.to_string())?;
            if local != *addr {
                return Err(format!("bound to {local}"));
            }
            Ok(())
        }
        Item::Udp { netns_cookie } => {
            is_socket(SockType::Datagram, false)?;
            in_netns(*netns_cookie)?;
            let local =
                std::net::UdpSocket::from(fd.try_clone_to_owned().map_err(|e| e.to_string())?)
                    .local_addr()
                    .map_err(|e| e.to_string())?;
            if local.port() != crate::tunnel::TUNNEL_PORT {
                return Err(format!("bound to {local}"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_checked_against_their_labels() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cookie = crate::netns::socket_netns_cookie(&listener).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let file: OwnedFd = std::fs::File::open("/proc/self/status").unwrap().into();
        let sockets = Sockets::default();
        let tcp = Item::Tcp {
            netns_cookie: cookie,
            addr,
        };
        let items = vec![
            tcp,
            // Lies: another netns, another address, a file as a socket, a socket as the lock,
            // a UDP socket not on the tunnel port.
            Item::Tcp {
                netns_cookie: cookie + 1,
                addr,
            },
            Item::Tcp {
                netns_cookie: cookie,
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            Item::Admin,
            Item::Lock,
            Item::Udp {
                netns_cookie: cookie,
            },
        ];
        let fds = vec![
            listener.as_fd().try_clone_to_owned().unwrap(),
            listener.as_fd().try_clone_to_owned().unwrap(),
            listener.as_fd().try_clone_to_owned().unwrap(),
            file.try_clone().unwrap(),
            listener.as_fd().try_clone_to_owned().unwrap(),
            udp.as_fd().try_clone_to_owned().unwrap(),
        ];
        let refused = sockets.receive(items, fds);
        assert_eq!(refused.len(), 5, "{refused:?}");
        let taken = sockets.take_tcp(cookie, addr).expect("the honest one");
        assert_eq!(taken.local_addr().unwrap(), addr);
        assert_eq!(sockets.close_untaken(), 0);
        let refused = sockets.receive(vec![Item::Lock], vec![file]);
        assert!(refused.is_empty(), "{refused:?}");
        assert!(sockets.take(&Item::Lock).is_some());
    }

    #[test]
    fn held_sockets_are_offered_lock_first_and_leave_with_their_pod() {
        let sockets = Sockets::default();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let pod = Item::Udp { netns_cookie: 5 };
        sockets.hold(pod, l.as_fd()).unwrap();
        sockets.hold(Item::Lock, f.as_fd()).unwrap();
        let held = sockets.held().unwrap();
        assert_eq!(
            held.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [Item::Lock, pod]
        );
        sockets.release_tcp(5);
        assert_eq!(sockets.held().unwrap().len(), 2, "only its TCP listeners");
        sockets.release_udp(5);
        assert_eq!(sockets.held().unwrap().len(), 1);
    }
}
