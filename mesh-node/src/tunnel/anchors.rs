//! Which trust roots are in force, so that a tunnel whose peer's chain ends at a root the
//! control plane withdrew is closed, whatever it carries: a withdrawn root is one the mesh no
//! longer vouches for (a CA rotated away or compromised).
//!
//! Every tunnel asks, once its handshake is done, for the token of its peer's root and ends
//! when it is cancelled: the destination through [`Credentials`] (proxy/inbound.rs), the source
//! through [`Anchors::watch_chain`] (the session's `watch`, the QUIC pool's sweep). The directory's follower calls
//! [`Anchors::keep_only`] with each new bundle before it publishes it, so a handshake made
//! under the old bundle that completes after the change finds its root already withdrawn.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use super::{pool, tls, TlsConfigs};

/// What a tunnel's peer proved at its handshake, and for how long it holds: the destination
/// takes new connections on the tunnel until [`Credentials::usable_until`], and ends the
/// tunnel (with what it carries) when `withdrawn` fires.
pub struct Credentials {
    /// The handshake's age limit for new connections ([`pool::SERVER_MAX_AGE`]) or the
    /// peer certificate's not-after, whichever comes first.
    pub usable_until: Instant,
    /// Cancelled when the root the peer's chain ends at leaves the trust bundle.
    pub withdrawn: CancellationToken,
}

impl Credentials {
    /// For a tunnel whose handshake just verified `chain` (leaf first) under `tls`.
    pub fn of(chain: &[CertificateDer<'_>], tls: &TlsConfigs, anchors: &Anchors) -> Self {
        let now = Instant::now();
        let mut usable_until = now + pool::SERVER_MAX_AGE;
        if let Some(not_after) = chain.first().and_then(tls::not_after) {
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            usable_until = usable_until.min(now + left);
        }
        Self {
            usable_until,
            withdrawn: anchors.watch_chain(chain, tls),
        }
    }

    /// Whether the tunnel may still take a new connection.
    pub fn usable(&self) -> bool {
        Instant::now() < self.usable_until && !self.withdrawn.is_cancelled()
    }
}

#[derive(Default)]
pub struct Anchors {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The roots in force, by [`super::tls::anchor_id`].
    current: HashSet<u64>,
    /// One token per root in force that a tunnel watches.
    tokens: HashMap<u64, CancellationToken>,
}

impl Anchors {
    /// Cancelled once `anchor` is withdrawn (already, if it is not in force).
    pub fn watch(&self, anchor: u64) -> CancellationToken {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !inner.current.contains(&anchor) {
            let withdrawn = CancellationToken::new();
            withdrawn.cancel();
            return withdrawn;
        }
        inner.tokens.entry(anchor).or_default().clone()
    }

    /// Cancelled once the root `chain` (verified under `tls`, leaf first) ends at is withdrawn.
    pub fn watch_chain(&self, chain: &[CertificateDer<'_>], tls: &TlsConfigs) -> CancellationToken {
        match tls.anchor_of(chain) {
            Some(anchor) => self.watch(anchor),
            // Verified, yet chaining to no root of the bundle: the bundle changed meanwhile.
            None => {
                let withdrawn = CancellationToken::new();
                withdrawn.cancel();
                withdrawn
            }
        }
    }

    /// Makes `current` the roots in force; tunnels that chain to any other root end.
    pub fn keep_only(&self, current: HashSet<u64>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let withdrawn: Vec<u64> = inner
            .tokens
            .keys()
            .filter(|a| !current.contains(a))
            .copied()
            .collect();
        for anchor in withdrawn {
            if let Some(token) = inner.tokens.remove(&anchor) {
                tracing::warn!(
                    root = format!("{anchor:016x}"),
                    "a trust root was withdrawn from the bundle; tunnels whose peers chain to it are closed"
                );
                token.cancel();
            }
        }
        inner.current = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::tls::tests::{ca, leaf, svid, trust, A};
    use crate::{identity::SvidStore, tunnel::TlsConfigs};

    /// Regression (issue 19): the destination took new connections on a session for as
    /// long as its client kept it, whatever its age, its certificate or its root.
    #[test]
    fn credentials_end_with_the_certificate_the_age_limit_or_the_root() {
        let mesh = ca();
        let tls = TlsConfigs::new(trust(&mesh), std::sync::Arc::new(SvidStore::default()));
        let anchors = Anchors::default();
        anchors.keep_only([tls::anchor_id(&mesh.root)].into());

        let long = Credentials::of(&[leaf(&svid(&mesh, A, -60, 3600))], &tls, &anchors);
        let limit = long.usable_until.saturating_duration_since(Instant::now());
        assert!(limit <= pool::SERVER_MAX_AGE && limit > pool::SERVER_MAX_AGE / 2);
        assert!(long.usable());

        // A certificate that expires in 5 s (x509 keeps whole seconds).
        let short = Credentials::of(&[leaf(&svid(&mesh, A, -60, 5))], &tls, &anchors);
        let left = short.usable_until.saturating_duration_since(Instant::now());
        assert!(
            left <= Duration::from_secs(6) && left >= Duration::from_secs(3),
            "{left:?}"
        );
        let expired = Credentials::of(&[leaf(&svid(&mesh, A, -60, -1))], &tls, &anchors);
        assert!(!expired.usable());

        // The root leaves the bundle: both tunnels end.
        anchors.keep_only(HashSet::new());
        assert!(long.withdrawn.is_cancelled() && short.withdrawn.is_cancelled());
        assert!(!long.usable());
    }

    #[test]
    fn tunnels_learn_that_their_root_was_withdrawn() {
        let anchors = Anchors::default();
        assert!(anchors.watch(1).is_cancelled(), "nothing is in force yet");
        anchors.keep_only([1, 2].into());
        let (on1, on2) = (anchors.watch(1), anchors.watch(2));
        assert!(!on1.is_cancelled() && !on2.is_cancelled());
        // A rotation: 3 joins, then 1 leaves.
        anchors.keep_only([1, 2, 3].into());
        assert!(!on1.is_cancelled());
        anchors.keep_only([2, 3].into());
        assert!(on1.is_cancelled(), "root 1 was withdrawn");
        assert!(!on2.is_cancelled());
        assert!(
            anchors.watch(1).is_cancelled(),
            "a late handshake under root 1"
        );
        assert!(!anchors.watch(3).is_cancelled());
    }
}
