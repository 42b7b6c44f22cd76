//! The first look mesh-cp takes at a bearer token before asking the Kubernetes API about it
//! (`node_auth::looks_right`): arbitrary text is refused or let through to the TokenReview,
//! without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = mesh_cp::node_auth::looks_right(
            token,
            "system:serviceaccount:mycel-system:mycel-node",
            std::time::SystemTime::now(),
        );
    }
});
