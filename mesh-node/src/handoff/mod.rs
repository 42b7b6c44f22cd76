//! Listener handoff: a new mesh-node started while another runs on the node takes over
//! everything the running one listens on, so that an upgrade refuses nothing.
//!
//! The running (old) daemon listens on a Unix socket under `/run/mycel` (`channel.rs`). The
//! new one asks it for its sockets (`protocol.rs`) and gets them with `SCM_RIGHTS`: per pod
//! the TCP listeners (outbound 15001, plaintext 15006, tunnel 15008) and the QUIC socket; the
//! admin, metrics and CNI listeners; the cgroup lock. It finishes its own start-up on them
//! (config, certificates from its own enrolment; the old one stops applying config while it
//! does), accepts on the same sockets (same accept queues: nothing waiting is dropped), then
//! tells the old one, which stops accepting, closes its QUIC connections and drains what it
//! relays for up to `--drain-timeout` before it exits.

pub mod channel;
pub mod gate;
pub mod new;
pub mod old;
pub mod protocol;
pub mod sockets;
