//! The CA's signing of a node's certificate request (`mesh-cp/src/ca.rs`): arbitrary DER as
//! a CSR is refused with a reason or signed for exactly the identity asked, never with what
//! the CSR claims.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_cp::ca::Ca;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mycel-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let ca = Ca::load_or_create(&dir.join("ca.crt"), &dir.join("ca.key"), true).expect("a CA");
        let _ = std::fs::remove_dir_all(&dir);
        ca
    })
}

fuzz_target!(|data: &[u8]| {
    let identity: mesh_model::SpiffeId = mesh_fuzz::SERVER_ID.parse().expect("an id");
    if let Ok(issued) = ca().sign_workload(data, &identity, Duration::from_secs(3600)) {
        let der = rustls::pki_types::CertificateDer::from(issued.der.to_vec());
        let id = mesh_node::tunnel::tls::spiffe_id(&der).expect("the issued certificate's id");
        assert_eq!(id, identity, "signed for another identity");
    }
});
