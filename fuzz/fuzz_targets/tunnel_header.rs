//! The tunnel header (`tunnel/header.rs`: one length-delimited protobuf message each way)
//! and the checks of a request (`inbound::parse`): arbitrary bytes from a peer decode to a
//! message, "not all there yet" or an error, within the 1 KiB limit, and a decoded request
//! is a delivery or a refusal naming the field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::v1::{TunnelRequest, TunnelResponse};
use mesh_node::{proxy::inbound, transport::Transport, tunnel::header};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = header::decode::<TunnelRequest>(data) {
        assert!(used <= data.len() && used <= header::MAX_HEADER + 3);
        let client = mesh_fuzz::CLIENT_ID.parse().expect("an id");
        if let Ok(d) = inbound::parse(&req, client, Transport::Tls) {
            assert_eq!(u32::from(d.destination.port()), req.destination_port);
        }
    }
    if let Ok(Some((_, used))) = header::decode::<TunnelResponse>(data) {
        assert!(used <= data.len());
    }
});
