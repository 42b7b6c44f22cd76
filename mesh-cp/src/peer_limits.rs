//! What others may cost the control plane before they are trusted: authentication attempts
//! that are expensive or fail (a TokenReview the API server must answer, a join token that
//! does not verify), per address, and TokenReviews from all addresses together; TLS
//! handshakes in progress on the gRPC port, per address and in all; config streams open, per
//! node and per address. The tables are bounded, so a crowd of addresses cannot grow them
//! without end either.

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
/// Config streams one node may hold open (it needs one).
pub const STREAMS_PER_NODE: u32 = 4;
/// Config streams one address may hold open: many nodes may share one behind a NAT.
pub const STREAMS_PER_ADDRESS: u32 = 256;
/// TLS handshakes in progress on mesh-cp's gRPC port, from one address and from all.
pub const HANDSHAKES_PER_ADDRESS: u32 = 32;
pub const HANDSHAKES: u32 = 512;
/// TokenReviews mesh-cp asks for, from every address together: a burst, then per second.
pub const REVIEW_BURST: f64 = 50.0;
pub const REVIEWS_PER_SECOND: f64 = 20.0;
/// Addresses tracked at most; past it, the least recently seen are forgotten (a forgotten
/// address starts again with a full burst, which is all it could have had anyway after a
/// quiet while).
const TRACKED: usize = 16_384;

#[derive(Default)]
pub struct PeerLimits {
    attempts: Mutex<HashMap<IpAddr, Bucket>>,
    /// Open config streams by node ("node:NAME") and by address ("addr:IP").
    streams: Mutex<HashMap<String, u32>>,
    reviews: Mutex<Option<Bucket>>,
    handshakes: Mutex<HashMap<IpAddr, u32>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl PeerLimits {
    /// Takes one attempt from `peer`'s allowance; false when it has none left.
    pub fn attempt(&self, peer: IpAddr) -> bool {
        self.attempt_at(peer, Instant::now())
    }

    fn attempt_at(&self, peer: IpAddr, now: Instant) -> bool {
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
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// One TokenReview from the allowance of all addresses together; false when it is spent.
    pub fn review(&self) -> bool {
        self.review_at(Instant::now())
    }

    fn review_at(&self, now: Instant) -> bool {
        let mut bucket = self.reviews.lock().unwrap_or_else(|p| p.into_inner());
        let b = bucket.get_or_insert(Bucket {
            tokens: REVIEW_BURST,
            at: now,
        });
        let regained = now.saturating_duration_since(b.at).as_secs_f64() * REVIEWS_PER_SECOND;
        b.tokens = (b.tokens + regained).min(REVIEW_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A place for one more config stream of `node` from `peer`, held until dropped; `None`
    /// when the node has [`STREAMS_PER_NODE`] open or the address [`STREAMS_PER_ADDRESS`].
    pub fn stream(self: &Arc<Self>, node: &str, peer: IpAddr) -> Option<StreamSlot> {
        let keys = [format!("node:{node}"), format!("addr:{peer}")];
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let full = |key: &String, max: u32| streams.get(key).is_some_and(|n| *n >= max);
        if full(&keys[0], STREAMS_PER_NODE) || full(&keys[1], STREAMS_PER_ADDRESS) {
            return None;
        }
        for key in &keys {
            *streams.entry(key.clone()).or_default() += 1;
        }
        Some(StreamSlot {
            limits: self.clone(),
            keys,
        })
    }

    /// A place for one TLS handshake from `peer` on the gRPC port, held until dropped.
    pub fn handshake(self: &Arc<Self>, peer: IpAddr) -> Option<HandshakeSlot> {
        let mut handshakes = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let total: u32 = handshakes.values().sum();
        let n = handshakes.entry(peer).or_default();
        if *n >= HANDSHAKES_PER_ADDRESS || total >= HANDSHAKES {
            if *n == 0 {
                handshakes.remove(&peer);
            }
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            limits: self.clone(),
            peer,
        })
    }
}

/// One open config stream of a node.
pub struct StreamSlot {
    limits: Arc<PeerLimits>,
    keys: [String; 2],
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .limits
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(n) = streams.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    streams.remove(key);
                }
            }
        }
    }
}

/// One TLS handshake in progress on the gRPC port.
pub struct HandshakeSlot {
    limits: Arc<PeerLimits>,
    peer: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut handshakes = self
            .limits
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = handshakes.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                handshakes.remove(&self.peer);
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
            assert!(l.attempt_at(a, t0), "attempt {i}");
        }
        assert!(!l.attempt_at(a, t0), "over the burst");
        assert!(l.attempt_at(b, t0), "another address has its own");
        let later = t0 + Duration::from_secs_f64(1.0 / ATTEMPTS_PER_SECOND);
        assert!(l.attempt_at(a, later), "one regained");
        assert!(!l.attempt_at(a, later));
    }

    #[test]
    fn the_table_of_addresses_stays_bounded() {
        let l = PeerLimits::default();
        let t0 = Instant::now();
        for i in 0..(TRACKED as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.attempt_at(ip, t0 + Duration::from_micros(u64::from(i)));
        }
        assert!(l.attempts.lock().unwrap().len() <= TRACKED);
    }

    #[test]
    fn streams_per_node_are_capped_and_given_back() {
        let l = Arc::new(PeerLimits::default());
        let a: IpAddr = "fd00::1".parse().unwrap();
        let held: Vec<_> = (0..STREAMS_PER_NODE)
            .map(|_| l.stream("n1", a).unwrap())
            .collect();
        assert!(l.stream("n1", a).is_none());
        // Other nodes behind the same address (a NAT) are not held up.
        let other = l.stream("n2", a);
        assert!(other.is_some());
        drop((held, other));
        let again = l.stream("n1", a);
        assert!(again.is_some());
        drop(again);
        assert!(l.streams.lock().unwrap().is_empty());
    }

    #[test]
    fn handshakes_are_capped_per_address_and_in_all() {
        let l = Arc::new(PeerLimits::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| l.handshake(a).unwrap())
            .collect();
        assert!(l.handshake(a).is_none());
        drop(held);
        let many: Vec<_> = (0..HANDSHAKES)
            .map(|i| {
                l.handshake(IpAddr::from(std::net::Ipv4Addr::from(i)))
                    .unwrap()
            })
            .collect();
        assert!(l.handshake(a).is_none(), "the port's total");
        drop(many);
        assert!(l.handshakes.lock().unwrap().is_empty());
    }

    #[test]
    fn token_reviews_are_capped_in_all() {
        let l = PeerLimits::default();
        let t0 = Instant::now();
        let allowed = (0..200).filter(|_| l.review_at(t0)).count();
        assert_eq!(allowed, REVIEW_BURST as usize);
        assert!(l.review_at(t0 + Duration::from_secs(1)));
    }
}
