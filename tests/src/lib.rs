//! Test topologies for Mycel: nodes and pods as network namespaces on this machine, and handles
//! for the daemons that run on them. Used by the end-to-end tests in `tests/tests/` and by
//! `cargo xtask up` and `cargo xtask bench`.

pub mod app;
pub mod bench;
pub mod browser;
pub mod cp;
pub mod daemon;
pub mod demo;
pub mod etcd;
pub mod kube;
pub mod mesh;
pub mod procfs;
pub mod prom;
pub mod relay;
pub mod scale;
pub mod topology;
pub mod tunnel;
pub mod wire;

/// Defines `tls::<test>` and `quic::<test>` for each named `fn <test>(transport: &str)` of the
/// calling test file, so an end-to-end test runs on both tunnel transports with the pod-local
/// hop on loopback TCP (`localHop: tcp`, the default); and the same under `sockmap::`, with the
/// hop through the socket map (`localHop: sockmap`).
#[macro_export]
macro_rules! on_both_transports {
    ($($test:ident),* $(,)?) => {
        mod tls {
            $(#[test] fn $test() { $crate::mesh::with_local_hop("tcp", || super::$test("tls")) })*
        }
        mod quic {
            $(#[test] fn $test() { $crate::mesh::with_local_hop("tcp", || super::$test("quic")) })*
        }
        mod sockmap {
            mod tls {
                $(#[test] fn $test() { $crate::mesh::with_local_hop("sockmap", || super::super::$test("tls")) })*
            }
            mod quic {
                $(#[test] fn $test() { $crate::mesh::with_local_hop("sockmap", || super::super::$test("quic")) })*
            }
        }
    };
}

/// Defines `tcp_hop::<test>` and `sockmap::<test>` for each named `fn <test>()` of the calling
/// test file, run with the pod-local hop on loopback TCP and through the socket map.
#[macro_export]
macro_rules! on_both_local_hops {
    ($($test:ident),* $(,)?) => {
        mod tcp_hop {
            $(#[test] fn $test() { $crate::mesh::with_local_hop("tcp", super::$test) })*
        }
        mod sockmap {
            $(#[test] fn $test() { $crate::mesh::with_local_hop("sockmap", super::$test) })*
        }
    };
}

pub use cp::ControlPlane;
pub use mesh::MeshNode;
pub use topology::{NodeSpec, Pod, Topology};
