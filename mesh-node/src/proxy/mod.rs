//! The node proxy: listeners inside each enrolled pod's netns and the connections they accept.

pub mod outbound;

use std::sync::atomic::AtomicU64;

/// Totals over all pods, shown on the admin endpoint.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    /// Accepted connections with no original-destination record; reset.
    pub no_orig_dst: AtomicU64,
    /// Upstream connect refused, unreachable or timed out; the client was reset.
    pub upstream_failed: AtomicU64,
    /// Relays that ended with an error and were reset on both sides.
    pub reset: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}
