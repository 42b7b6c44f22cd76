//! Capturing pods before they start, in Kubernetes: a CNI plugin chained after the cluster's
//! network plugin reports each new pod's netns to the daemon and waits until it is enrolled.
//!
//! - `plugin.rs`: the plugin (this binary, run as `mycel-cni` by the container runtime).
//! - `protocol.rs`: what the plugin and the daemon say on the daemon's Unix socket.
//! - `server.rs`: the daemon's end of that socket.
//! - `install.rs`: `mesh-node install-cni`, which puts the plugin in place and chains it.

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod server;
