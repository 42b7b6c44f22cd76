//! mesh-cp's parts, as a library: the control plane (`main.rs`) is built from them, and the
//! fuzz targets (`fuzz/`) reach the CA and the node authentication through them.

pub mod ca;
pub mod dir_apply;
pub mod distribute;
pub mod explain;
pub mod files;
pub mod first_version;
pub mod grpc;
pub mod kubernetes;
pub mod metrics;
pub mod node_auth;
pub mod peer_limits;
pub mod server;
#[cfg(test)]
pub mod slice;
pub mod source;
pub mod state;
pub mod status;
pub mod store;
pub mod tokens;
pub mod ui;
