//! The CNI plugin's request line on the daemon's socket (`cni/protocol.rs`): a request or a
//! one-line reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::cni::protocol;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Err(reason) = protocol::parse_request(line) {
            assert!(
                !reason.contains('\n'),
                "a reason over several lines: {reason}"
            );
        }
    }
});
