//! What mesh-node and mesh-cp both do around their own work, kept in one place so the two
//! binaries start, log, stop and fail the same way.

pub mod cli;
pub mod exit;
pub mod logging;
pub mod runtime;
pub mod signals;
