//! Test topologies for Mycel: nodes and pods as network namespaces on this machine, and handles
//! for the daemons that run on them. Used by the end-to-end tests in `tests/tests/` and by
//! `cargo xtask up` and `cargo xtask bench`.

pub mod app;
pub mod bench;
pub mod cp;
pub mod daemon;
pub mod kube;
pub mod mesh;
pub mod prom;
pub mod topology;
pub mod tunnel;
pub mod wire;

/// Defines `tls::<test>` and `quic::<test>` for each named `fn <test>(transport: &str)` of the
/// calling test file, so an end-to-end test runs on both tunnel transports.
#[macro_export]
macro_rules! on_both_transports {
    ($($test:ident),* $(,)?) => {
        mod tls {
            $(#[test] fn $test() { super::$test("tls") })*
        }
        mod quic {
            $(#[test] fn $test() { super::$test("quic") })*
        }
    };
}

pub use cp::ControlPlane;
pub use mesh::MeshNode;
pub use topology::{NodeSpec, Pod, Topology};
