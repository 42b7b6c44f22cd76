//! A handoff message as the daemon reads it from its handoff socket (`handoff/protocol.rs`),
//! with any count of descriptors said to have come with it: a message, or a one-line reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::handoff::protocol::{Message, MAX_FDS};

fuzz_target!(|data: &[u8]| {
    let Some((&fds, bytes)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds) % (MAX_FDS + 2);
    match Message::decode(bytes, fds) {
        Ok(msg) => {
            assert_eq!(msg.fds(), fds);
            // What decodes encodes again, and to the same message.
            let again = msg.encode().expect("a decoded message encodes");
            assert_eq!(Message::decode(&again, fds).expect("round trip"), msg);
        }
        Err(e) => {
            let reason = e.to_string();
            assert!(
                !reason.contains('\n'),
                "a reason over several lines: {reason}"
            );
        }
    }
});
