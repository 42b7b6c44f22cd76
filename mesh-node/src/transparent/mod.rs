//! The application sees its real client: the proxy's connection to a pod's application comes
//! from the source's address, not from the pod's own.
//!
//! The socket toward the application is transparent (`IP_TRANSPARENT`, which lets it bind an
//! address that is not local), bound to the source's address and marked [`MARK`]
//! (`socket.rs`). The application's answers must come back to that socket rather than leave
//! by the pod's interface toward the real source, so each enrolled pod's netns gets a policy
//! rule (packets of sockets marked [`MARK`] look up table [`TABLE`]), a route in that table
//! (every destination is local, over loopback) and three sysctls (`routing.rs`). They are
//! made at enrolment and removed once the pod has left the mesh and its last such connection
//! has ended (`lifetime.rs`); a netns that is deleted takes them with it.
//!
//! Only the proxy's sockets toward the application carry the mark; the application's own
//! connections, and the sockets it accepts from anyone else, are unmarked and routed as
//! before. An application listener that sets its own `SO_MARK` does not take the SYN's mark
//! and would answer by its interface (then the connect times out): not supported. Where the
//! routing cannot be made, the proxy connects from the pod's own address, as before, and the
//! log and `mycel_enrolled_without_client_address` say so.

mod lifetime;
mod netlink;
mod routing;
mod socket;

pub use lifetime::{InUse, NetnsRoutes, Routes};
pub use routing::SetUpError;
pub use socket::{socket_from, usable_source, PeerHold, PlaintextPeers};

/// The mark on the proxy's sockets toward the application. One mark value matched exactly;
/// its bits are clear of those CNIs use for their own routing (Cilium 0x0f00, Calico's
/// upper bits are on the host's packets, not on a pod's sockets).
pub const MARK: u32 = mesh_ebpf_common::TRANSPARENT_MARK;
/// The routing table of the return route ("MC").
pub const TABLE: u32 = 0x4d43;
/// The rule's priority: after the `local` table's (0), before `main`'s (32766).
pub const PRIORITY: u32 = 0x4d43;

/// The address families whose return routing is in place in a netns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    fn bits(self) -> u8 {
        u8::from(self.v4) | u8::from(self.v6) << 1
    }

    fn from_bits(bits: u8) -> Self {
        Self {
            v4: bits & 1 != 0,
            v6: bits & 2 != 0,
        }
    }

    /// Whether connections to `addr` can be made transparent.
    pub fn routes(self, addr: std::net::SocketAddr) -> bool {
        if addr.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}
