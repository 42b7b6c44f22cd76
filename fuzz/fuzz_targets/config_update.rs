//! A config update as the node receives it from mesh-cp, in parts (`mesh_api::parts`) and
//! applied (`MeshView::apply`), then the routing directory built from the view it gives: every
//! VIP routed, a backend picked by each route and the traffic settings resolved for a source. The control plane is trusted, but a node must
//! refuse what it could not have sent rather than panic or hold a value the model cannot.
#![no_main]

use std::{net::IpAddr, sync::Arc};

use libfuzzer_sys::fuzz_target;
use mesh_api::{
    parts::{self, Assembler},
    v1::ConfigUpdate,
};
use mesh_model::authz::Source;
use mesh_node::{
    control::MeshView,
    proxy::directory::{Directory, Route},
};
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(mut update) = ConfigUpdate::decode(data) else {
        return;
    };
    // A part with any flags is taken or refused, twice in a row too.
    let mut stream = Assembler::default();
    let _ = stream.push(update.clone());
    let _ = stream.push(update.clone());
    // Split into parts as the control plane sends them and put back together, the version is
    // what it was.
    update.more = false;
    let mut stream = Assembler::default();
    let mut whole = None;
    for part in parts::split(update.clone()) {
        assert!(whole.is_none(), "whole before the last part");
        // What the control plane sends reads as what the node takes.
        let part = ConfigUpdate::decode(part.encode_to_vec().as_slice())
            .expect("an encoded part reads as a ConfigUpdate");
        whole = stream
            .push(part)
            .expect("the parts of one version fit together");
    }
    assert_eq!(whole.as_ref(), Some(&update));
    let Ok(view) = MeshView::default().apply(update.clone()) else {
        return;
    };
    // The same resources again as a patch: upserts over what is there, then the removals.
    update.snapshot = false;
    update.version = view.version.wrapping_add(1).max(1);
    let view = view.apply(update).unwrap_or(view);
    let dir = Directory::new(&view, Arc::default());
    let source = Source {
        address: IpAddr::from([10, 0, 0, 9]),
        workload: None,
    };
    for s in view.services.values() {
        for vip in s.vips.iter().filter_map(|v| mesh_api::ip_from_bytes(v)) {
            for p in &s.ports {
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                if let Route::Service(entry) = dir.route((vip, port).into()) {
                    for roll in [0, 1, u64::MAX] {
                        if let Some(backend) = entry.pick(vip, roll) {
                            let settings = backend.settings(&source);
                            let _ = settings.sections();
                            let _ = backend.targets(vip);
                        }
                    }
                }
            }
        }
    }
});
