//! What one address may cost the control plane before it is trusted: authentication attempts
//! that are expensive or fail (a TokenReview the API server must answer, a join token that
//! does not verify), and config streams open at once. Both are counted per peer address;
//! the tables are bounded, so a crowd of addresses cannot grow them without end either.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

/// Attempts an address may make at once after a quiet while.
pub const ATTEMPT_BURST: f64 = 10.0;
/// Attempts per second an address regains.
pub const ATTEMPTS_PER_SECOND: f64 = 0.5;
/// Config streams one address may hold open (a node needs one).
pub const STREAMS_PER_PEER: u32 = 4;
/// Addresses tracked at most; past it, the least recently seen are forgotten (a forgotten
/// address starts again with a full burst, which is all it could have had anyway after a
/// quiet while).
const TRACKED: usize = 16_384;

#[derive(Default)]
pub struct PeerLimits {
    attempts: Mutex<HashMap<IpAddr, Bucket>>,
    streams: Mutex<HashMap<IpAddr, u32>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl PeerLimits {
    /// Takes one attempt from `peer`'s allowance; false when it has none left.
    pub fn attempt(&self, peer: IpAddr) -> bool {
        self.attempt_at(peer, Instant::now(), true)
    }

    /// Whether `peer` has an attempt left, without taking it.
    pub fn allows(&self, peer: IpAddr) -> bool {
        self.attempt_at(peer, Instant::now(), false)
    }

    fn attempt_at(&self, peer: IpAddr, now: Instant, take: bool) -> bool {
        let mut buckets = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= TRACKED && !buckets.contains_key(&peer) {
            // Forget the addresses seen least recently (the oldest half).
            let mut seen: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            seen.sort_unstable();
            let cut = seen[seen.len() / 2];
            buckets.retain(|_, b| b.at > cut);
        }
        let b = buckets.entry(peer).or_insert(Bucket {
            tokens: ATTEMPT_BURST,
            at: now,
        });
        let regained = now.saturating_duration_since(b.at).as_secs_f64() * ATTEMPTS_PER_SECOND;
        b.tokens = (b.tokens + regained).min(ATTEMPT_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            if take {
                b.tokens -= 1.0;
            }
            true
        } else {
            false
        }
    }

    /// A place for one more config stream from `peer`, held until dropped; `None` when it
    /// has [`STREAMS_PER_PEER`] open.
    pub fn stream(self: &Arc<Self>, peer: IpAddr) -> Option<StreamSlot> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = streams.entry(peer).or_default();
        if *n >= STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            limits: self.clone(),
            peer,
        })
    }
}

/// One open config stream of a peer.
pub struct StreamSlot {
    limits: Arc<PeerLimits>,
    peer: IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .limits
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = streams.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn attempts_come_in_a_burst_then_at_the_refill_rate_per_address() {
        let l = PeerLimits::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..ATTEMPT_BURST as usize {
            assert!(l.attempt_at(a, t0, true), "attempt {i}");
        }
        assert!(!l.attempt_at(a, t0, true), "over the burst");
        assert!(l.attempt_at(b, t0, true), "another address has its own");
        let later = t0 + Duration::from_secs_f64(1.0 / ATTEMPTS_PER_SECOND);
        assert!(l.attempt_at(a, later, true), "one regained");
        assert!(!l.attempt_at(a, later, true));
    }

    #[test]
    fn the_table_of_addresses_stays_bounded() {
        let l = PeerLimits::default();
        let t0 = Instant::now();
        for i in 0..(TRACKED as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.attempt_at(ip, t0 + Duration::from_micros(u64::from(i)), true);
        }
        assert!(l.attempts.lock().unwrap().len() <= TRACKED);
    }

    #[test]
    fn streams_per_peer_are_capped_and_given_back() {
        let l = Arc::new(PeerLimits::default());
        let a: IpAddr = "fd00::1".parse().unwrap();
        let held: Vec<_> = (0..STREAMS_PER_PEER)
            .map(|_| l.stream(a).unwrap())
            .collect();
        assert!(l.stream(a).is_none());
        drop(held);
        let again = l.stream(a);
        assert!(again.is_some());
        drop(again);
        assert!(l.streams.lock().unwrap().is_empty());
    }
}
