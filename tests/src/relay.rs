//! A TCP relay on loopback between a client and a server, for tests that need to cut a
//! connection (not stop a process) and count what crossed it: every connection's bytes from
//! the server are counted, `cut` breaks the open ones, and `hold` refuses new ones for a while.

use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
};

#[derive(Default)]
struct State {
    /// Per connection, in the order they came: bytes from the server to the client.
    received: Mutex<Vec<Arc<AtomicU64>>>,
    open: Mutex<Vec<TcpStream>>,
    holding: AtomicBool,
    stopped: AtomicBool,
}

pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<State>,
    /// Where it listens, when not in the test's own netns.
    netns: Option<PathBuf>,
}

impl Relay {
    /// Relays 127.0.0.1:(a free port) to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0")?, target, None)
    }

    /// Relays 127.0.0.1:(a free port) inside `netns` to `target` in the test's own netns: a
    /// process in a netns with no route out reaches one server, and nothing else.
    pub fn start_in(netns: &Path, target: SocketAddr) -> io::Result<Self> {
        let listener = crate::tunnel::in_netns(netns, || TcpListener::bind("127.0.0.1:0"))?;
        Self::start_on(listener, target, Some(netns.to_path_buf()))
    }

    fn start_on(
        listener: TcpListener,
        target: SocketAddr,
        netns: Option<PathBuf>,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let shared = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if shared.holding.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let count = Arc::new(AtomicU64::new(0));
                lock(&shared.received).push(count.clone());
                {
                    let mut open = lock(&shared.open);
                    open.extend(client.try_clone().ok());
                    open.extend(server.try_clone().ok());
                }
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                thread::spawn(move || pipe(client, server, None));
                thread::spawn(move || pipe(s2, c2, Some(count)));
            }
        });
        Ok(Self { addr, state, netns })
    }

    /// Bytes the server sent on each connection so far, in the order they were accepted.
    pub fn received(&self) -> Vec<u64> {
        lock(&self.state.received)
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }

    /// Breaks every open connection (both ends see it end).
    pub fn cut(&self) {
        for s in lock(&self.state.open).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// While true, new connections are closed as soon as they are accepted.
    pub fn hold(&self, holding: bool) {
        self.state.holding.store(holding, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so that it sees `stopped`.
        let _ = match &self.netns {
            Some(netns) => crate::tunnel::connect_in(netns, self.addr),
            None => TcpStream::connect(self.addr),
        };
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(c) = &count {
                    c.fetch_add(n as u64, Ordering::SeqCst);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
