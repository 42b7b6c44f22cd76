//! A config dir's file edited, as mesh-cp's `mesh_model::Parser` reads it: the file is cut at
//! its `---` lines and only the pieces whose text changed are parsed again. Whatever the
//! file held before and after the edit, the parser's answer is the one parsing the new text
//! afresh gives (`mesh_model::parse`): the same config, or the same one-line error.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The file before and after the edit, apart at the first NUL (none: the file is new).
    let (before, after) = text.split_once('\0').unwrap_or(("", text));
    let file = |t: &str| vec![(PathBuf::from("f.yaml"), t.to_owned())];
    let fresh = |t: &str| mesh_model::parse(&file(t)).map_err(|e| e.to_string());
    let mut parser = mesh_model::Parser::default();
    for t in [before, after] {
        let got = parser.parse(&file(t)).map_err(|e| e.to_string());
        assert_eq!(got, fresh(t), "{t:?}");
    }
});
