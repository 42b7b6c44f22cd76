//! A configuration document (`mesh_model::parse_document`), as a config dir file or a custom
//! resource a namespace user writes: every kind is read with its validation, accepted or
//! refused with a one-line reason.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for doc in serde_yaml::Deserializer::from_str(text).take(8) {
        let Ok(value) = serde_yaml::Value::deserialize(doc) else {
            return;
        };
        if let Err(reason) = mesh_model::parse_document(value) {
            assert!(!reason.is_empty());
        }
    }
});

use serde::Deserialize as _;
