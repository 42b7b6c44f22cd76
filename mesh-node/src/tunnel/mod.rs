//! The node-to-node tunnel: TLS 1.3 on port 15008 between the source and destination pods'
//! netns, each side presenting its workload's SVID.
//!
//! This step has the TLS identity layer only (`tls.rs`); the listener, the header exchange and
//! the relay that use it come next.

pub mod tls;
