//! Test topologies for Mycel: nodes and pods as network namespaces on this machine, and handles
//! for the daemons that run on them. Used by the end-to-end tests in `tests/tests/` and by
//! `cargo xtask up` and `cargo xtask bench`.

pub mod app;
pub mod bench;
pub mod cp;
pub mod daemon;
pub mod mesh;
pub mod topology;
pub mod tunnel;
pub mod wire;

pub use cp::ControlPlane;
pub use mesh::MeshNode;
pub use topology::{NodeSpec, Pod, Topology};
