//! Kubernetes plumbing that mesh-cp and mesh-node share.
//!
//! - `reflect.rs`: reflectors retried with backoff, whose stores keep the last state through
//!   an API outage.
//! - `fake.rs` (feature `fake`, tests only): the stand-in for the API server, the one the
//!   codebase allows. It answers through kube's mock service in unit tests, or on a loopback
//!   port for the end-to-end tests that run the daemons as processes.

pub mod reflect;

#[cfg(feature = "fake")]
pub mod fake;

pub use reflect::{ApiHealth, Reflectors, Retry};
