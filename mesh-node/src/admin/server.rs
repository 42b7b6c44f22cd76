//! The HTTP/1.1 server under the admin and metrics endpoints: hyper's parser, axum's routing,
//! and the limits a port open to the network needs.
//!
//! `axum::serve` cannot set them: it builds hyper's connection without a timer, so hyper's
//! header read timeout never fires, and lets a request head grow to hyper's read buffer
//! (~400 KiB). The connections are served with hyper's http1 builder here instead.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};

/// What one client may make an endpoint hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the connection's start to the end of the request head: a client that dribbles its
    /// request line is cut off here.
    pub header_read: Duration,
    /// From accept to close, the answer included: a client that does not read it does not
    /// keep its slot.
    pub connection: Duration,
    /// The request head, request line included, complete or not; a longer one gets 431.
    pub head_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub connections: usize,
    /// Connections served at once from one address (an IPv6 one counts by its /64) while more
    /// than half of `connections` are taken; more are closed at once. So a few pods cannot
    /// hold every slot and keep the scraper out, and without that pressure, clients that share
    /// an address (behind a NAT, or pods of one node's IPv6 range) are never refused.
    pub per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(10),
            head_bytes: 4096,
            connections: 128,
            per_source: 8,
        }
    }
}

/// Serves `app` on `listener` until the process ends, one request per connection.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_header_size(limits.head_bytes)
        // Probes and scrapers come every few seconds at most: a kept-alive connection would
        // only hold a slot between them.
        .keep_alive(false);
    let slots = Arc::new(Semaphore::new(limits.connections));
    let sources = Arc::new(Sources::default());
    let listen = listener.local_addr().ok();
    loop {
        // A slot before the accept: past the limit, connections wait in the kernel's backlog
        // rather than as tasks here.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, typically: wait for some to be given back.
                tracing::warn!(?listen, error = %e, "HTTP endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let taken = limits.connections - slots.available_permits();
        let pressed = taken > limits.connections / 2;
        let Some(source) = sources.take(peer.ip(), limits.per_source, pressed) else {
            // Not logged: the one who can cause it could flood the log with it.
            drop(tcp);
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limits.connection, conn).await;
            drop((source, slot));
        });
    }
}

/// Connections open per source address. An entry lives while its source has one open, so
/// there are at most as many as there are slots.
#[derive(Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its source; given back on drop.
struct SourceSlot {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Sources {
    /// Counts a connection from `peer`, or refuses it when `pressed` and the peer holds `max`.
    fn take(self: &Arc<Self>, peer: IpAddr, max: usize, pressed: bool) -> Option<SourceSlot> {
        let key = match peer.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        };
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if pressed && open.get(&key).is_some_and(|n| *n >= max) {
            return None;
        }
        *open.entry(key).or_default() += 1;
        Some(SourceSlot {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}
