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

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use mesh_model::SpiffeId;

use super::Session;
use crate::workloads::WorkloadId;

/// How long an unused session is kept.
pub const IDLE: Duration = Duration::from_secs(15);
/// How long the destination waits for another header on an idle session.
pub const SERVER_IDLE: Duration = Duration::from_secs(60);
/// How long after its handshake a session may still be handed out.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Idle sessions kept per key: enough for a burst of concurrent connections.
const PER_KEY: usize = 16;

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
        self.since.elapsed() < IDLE && self.session.age() < MAX_AGE
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl Pool {
    /// The most recently used fresh session for `key`; stale ones are dropped (closing them).
    pub fn take(&self, key: &Key) -> Option<Box<Session>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        let found = loop {
            match list.pop() {
                Some(s) if s.fresh() => break Some(s.session),
                Some(_) => continue,
                None => break None,
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Keeps `session` for `key`, and drops every stale session of the pool.
    pub fn put(&self, key: Key, session: Box<Session>) {
        if session.age() >= MAX_AGE || !session.reusable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(Idle::fresh);
            !list.is_empty()
        });
        let list = idle.entry(key).or_default();
        if list.len() < PER_KEY {
            list.push(Idle {
                session,
                since: Instant::now(),
            });
        }
    }
}
