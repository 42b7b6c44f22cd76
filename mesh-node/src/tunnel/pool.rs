//! Idle tunnel sessions, kept for the next connection between the same two pods.
//!
//! A full handshake costs both nodes signatures and verifications; reusing a session costs
//! one header exchange. A session goes back to the pool only when both directions of its
//! last connection ended in order (see `session.rs`). Policy is still decided per
//! connection: the destination checks every header as it checks a new tunnel's.
//!
//! Sessions are keyed by everything their handshake established: the source pod (its netns
//! and address are the tunnel's source) and the certificate it presented, the destination
//! pod's tunnel address, the identity the destination proved, and the trust bundle. So a
//! renewed source certificate is used by the next connection. Sessions are kept for at most
//! [`IDLE`] unused and [`MAX_AGE`] in all, so a destination's renewed certificate is in use
//! within a minute; the destination closes sessions idle for longer than [`IDLE`] does here.
//!
//! New handshakes from a pod to the pods of one node are gated ([`Pool::gate`]): at most
//! [`HANDSHAKES_IN_FLIGHT`] at once, the others wait for one of them or for a session to come
//! back. A burst of new connections then never meets the destination node's limit on
//! handshakes from one source (across its pods), which is there for strangers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use mesh_model::SpiffeId;

use super::Session;
use crate::workloads::WorkloadId;

/// How long an unused session is kept.
pub const IDLE: Duration = Duration::from_secs(15);
/// How long the destination waits for another header on an idle session.
pub const SERVER_IDLE: Duration = Duration::from_secs(60);
/// How long after its handshake a session may still be handed out.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// How long after its handshake the destination still takes a new connection on a session
/// or QUIC connection: the source's [`MAX_AGE`], plus the time its header may take to come.
pub const SERVER_MAX_AGE: Duration = Duration::from_secs(70);
/// Idle sessions kept per key: enough for a burst of concurrent connections.
const PER_KEY: usize = 16;
/// New handshakes one source pod has in flight to the pods of one node: half the destination
/// node's default per-source handshake limit.
pub const HANDSHAKES_IN_FLIGHT: usize = 64;
/// Handshake gates kept before the unused ones are looked for and dropped.
const GATES_KEPT: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: WorkloadId,
    /// Serial of the source's certificate.
    pub source_serial: String,
    pub destination: SocketAddr,
    pub identity: SpiffeId,
    pub trust: u64,
}

struct Idle {
    session: Box<Session>,
    since: Instant,
}

impl Idle {
    fn fresh(&self) -> bool {
        self.since.elapsed() < IDLE && self.session.age() < MAX_AGE && self.session.reusable()
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// Set when the daemon stops taking connections (shutdown, handoff): sessions coming
    /// back are ended instead of kept.
    closed: std::sync::atomic::AtomicBool,
    /// Sessions being ended in order, which shutdown waits for.
    retiring: tokio_util::task::TaskTracker,
    /// Handshake gates by source pod and destination node; an entry goes once nobody holds or
    /// waits for it.
    gates: Mutex<HashMap<(WorkloadId, String), Arc<Semaphore>>>,
}

impl Pool {
    /// The most recently used fresh session for `key`; stale ones are dropped (closing them).
    pub fn take(&self, key: &Key) -> Option<Box<Session>> {
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.get_mut(key)?;
            let found = loop {
                match list.pop() {
                    Some(s) if s.fresh() && !s.session.peer_spoke() => break Some(s.session),
                    Some(s) => stale.push(s.session),
                    None => break None,
                }
            };
            if list.is_empty() {
                idle.remove(key);
            }
            found
        };
        // Outside the lock: ending a session may read from its socket.
        for session in stale {
            self.retire(session);
        }
        found
    }

    /// A place among the handshakes in flight from `key`'s source to the pods of `node`
    /// (where `key`'s destination runs); waits while [`HANDSHAKES_IN_FLIGHT`] are. The caller
    /// bounds the wait. (`None` cannot happen: gates are never closed.)
    pub async fn gate(&self, key: &Key, node: &str) -> Option<OwnedSemaphorePermit> {
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
            if gates.len() >= GATES_KEPT {
                // Forget the gates nobody uses (held only by the map, every permit back).
                gates.retain(|_, g| {
                    Arc::strong_count(g) > 1 || g.available_permits() < HANDSHAKES_IN_FLIGHT
                });
            }
            gates
                .entry((key.source.clone(), node.to_owned()))
                .or_insert_with(|| Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT)))
                .clone()
        };
        gate.acquire_owned().await.ok()
    }

    /// Keeps `session` for `key`, and ends every stale session of the pool.
    pub fn put(&self, key: Key, session: Box<Session>) {
        let closed = self.closed.load(std::sync::atomic::Ordering::Acquire);
        if closed || session.age() >= MAX_AGE || !session.reusable() {
            return self.retire(session);
        }
        let mut stale = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            // For this key also those their destination ended meanwhile (a daemon that was
            // taken over closes the sessions it kept): dropped now, while its side still
            // waits for ours. Asking costs a syscall, so only here, not for every key.
            idle.retain(|k, list| {
                let this = *k == key;
                stale.extend(
                    list.extract_if(.., |s| !s.fresh() || (this && s.session.peer_spoke()))
                        .map(|s| s.session),
                );
                !list.is_empty()
            });
            let list = idle.entry(key).or_default();
            if list.len() < PER_KEY {
                list.push(Idle {
                    session,
                    since: Instant::now(),
                });
            } else {
                stale.push(session);
            }
        }
        for session in stale {
            self.retire(session);
        }
    }

    /// Ends every idle session and every one that comes back from now on: the daemon takes
    /// no more connections.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for idle in idle.into_values().flatten() {
            self.retire(idle.session);
        }
    }

    /// Waits for the sessions being ended to be (each takes at most [`RETIRE_TIMEOUT`]): a
    /// process that exits first resets them.
    pub async fn retired(&self) {
        self.retiring.close();
        self.retiring.wait().await;
    }

    /// Ends a session the pool does not keep with close_notify, so that the destination
    /// closes its side in order too (a session dropped without one looks cut short there, and
    /// is reset). One that can carry nothing more is dropped, and one the destination ended
    /// first (a daemon that no longer takes connections closes its idle sessions) is dropped
    /// without a word.
    fn retire(&self, mut session: Box<Session>) {
        if !session.reusable() {
            return;
        }
        if session.peer_spoke() {
            return session.discard();
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            self.retiring.spawn(async move {
                let _ = tokio::time::timeout(RETIRE_TIMEOUT, session.close_and_drain()).await;
            });
        }
    }
}

/// How long ending a session in order may take before it is simply dropped.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, destination: &str) -> Key {
        Key {
            source: WorkloadId::new("default", source),
            source_serial: "1".into(),
            destination: destination.parse().unwrap(),
            identity: "spiffe://td/ns/default/sa/b".parse().unwrap(),
            trust: 1,
        }
    }

    #[tokio::test]
    async fn handshakes_in_flight_are_gated_per_pod_and_node() {
        let pool = Pool::default();
        let ab = key("a", "10.0.0.2:15008");
        let mut held = Vec::new();
        for _ in 0..HANDSHAKES_IN_FLIGHT {
            held.push(pool.gate(&ab, "n2").await);
        }
        let next = pool.gate(&ab, "n2");
        tokio::pin!(next);
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut next).await;
        assert!(waited.is_err(), "a handshake over the gate went ahead");
        // Another pod of the same node shares the gate; another node, or another source, has
        // its own.
        let same_node = key("a", "10.0.0.3:15008");
        let other_pod =
            tokio::time::timeout(Duration::from_millis(50), pool.gate(&same_node, "n2"));
        assert!(
            other_pod.await.is_err(),
            "the node's gate is shared by its pods"
        );
        assert!(pool.gate(&key("a", "10.0.1.3:15008"), "n3").await.is_some());
        assert!(pool.gate(&key("c", "10.0.0.2:15008"), "n2").await.is_some());
        held.pop();
        assert!(
            next.await.is_some(),
            "a handshake that ended lets the next one go"
        );
    }
}
