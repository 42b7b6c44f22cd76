//! Mycel's telemetry, read back: what `mycel` and mesh-cp's dashboard show of the nodes'
//! metrics, and the bounded HTTP client both read endpoints with.

pub mod client;
pub mod exposition;
pub mod prometheus;
pub mod traffic;
