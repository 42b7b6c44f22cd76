//! Certificates a peer presents (`tunnel/tls.rs`): the SPIFFE ID, serial, expiry and trust
//! root read from arbitrary DER, a trust bundle made of arbitrary roots, and SPIFFE IDs from
//! arbitrary text. Each answers or refuses; none panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::tunnel::tls;
use rustls::pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let cert = CertificateDer::from(data);
    let _ = tls::spiffe_id(&cert);
    let _ = tls::serial(&cert);
    let _ = tls::not_after(&cert);
    let _ = tls::peer_identity(Some(std::slice::from_ref(&cert)));
    let pki = mesh_fuzz::pki();
    let _ = pki.trust.anchor_of(&[cert.clone(), pki.leaf.clone()]);
    let _ = pki.trust.anchor_of(&[cert]);
    let _ = tls::Trust::new(&[data.to_vec()], "cluster.local");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<mesh_model::SpiffeId>();
    }
});
