//! What mesh-node and mesh-cp both do around their own work, kept in one place so the two
//! binaries start, log, stop, fail and follow their input files the same way.

pub mod cli;
pub mod exit;
pub mod follow;
pub mod host;
pub mod logging;
pub mod runtime;
pub mod signals;
pub mod time;
