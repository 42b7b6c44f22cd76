//! mesh-node's parts, as a library: the daemon (`main.rs`) is built from them, and the fuzz
//! targets (`fuzz/`) reach the parsers through them. See the crate's README for what each
//! module owns.

pub mod access_log;
pub mod admin;
pub mod capture;
pub mod cni;
pub mod control;
pub mod enroll;
pub mod handoff;
pub mod identity;
pub mod kubernetes;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod proxy;
pub mod socket;
pub mod transparent;
pub mod transport;
pub mod tunnel;
pub mod workloads;
