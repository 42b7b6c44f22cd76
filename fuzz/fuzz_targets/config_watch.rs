//! What a node that takes workloads on demand asks its control plane for and releases
//! (`ConfigAck.watch`, `watch_addresses`, `unwatch`, `unwatch_addresses`), as mesh-cp takes it (`distribute::Watches`): any message is taken whole
//! or refused whole, the watches stay within their bound, and what is sent for them is a
//! workload or an address no workload has.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use mesh_api::v1::ConfigAck;
use mesh_cp::{
    distribute::{demand::MAX_WATCHES, Watches},
    state::Published,
};
use prost::Message as _;

const CONFIG: &str = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /run/netns/a, addresses: [10.0.0.1]}\n---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: b}\nspec: {node: n2, netns: /run/netns/b, addresses: [10.0.0.2, 'fd00::2']}\n";

fn published() -> &'static Published {
    static PUBLISHED: OnceLock<Published> = OnceLock::new();
    PUBLISHED.get_or_init(|| {
        let config = mesh_model::parse(&[(PathBuf::from("c.yaml"), CONFIG.into())])
            .expect("the fixed config parses");
        Published::new(1, config)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = ConfigAck::decode(data) else {
        return;
    };
    let catalog = &published().distribution.catalog;
    let mut watches = Watches::default();
    // Twice: the second time everything asked is watched already, and changes nothing.
    for _ in 0..2 {
        let before = watches.len();
        match watches.request(&message) {
            Ok(()) => assert!(watches.len() <= MAX_WATCHES),
            Err(_) => assert_eq!(watches.len(), before, "a refused message took something"),
        }
        let answers = watches.answer(catalog);
        // Each watched address adds at most the one workload that has it.
        assert!(watches.len() <= 2 * MAX_WATCHES);
        for key in &answers.keys {
            assert!(key.starts_with("workload/"), "{key}");
            let _ = watches.entry(catalog, "n1", key);
            let _ = watches.keeps(catalog, key);
        }
        for ip in answers.absent {
            assert!(catalog.workload_at(ip).is_none(), "{ip} has a workload");
        }
        for raw in &message.watch_addresses {
            if let Some(ip) = mesh_api::ip_from_bytes(raw).map(|ip| ip.to_canonical()) {
                let _ = catalog.workload_at(ip);
            }
        }
    }
    let again = watches.answer_all(catalog);
    for ip in again.absent {
        assert!(catalog.workload_at(ip).is_none(), "{ip} has a workload");
    }
    let _ = watches.snapshot(catalog, "n1").count();
});
