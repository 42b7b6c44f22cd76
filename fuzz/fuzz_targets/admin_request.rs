//! The admin and metrics endpoints' request reader (`admin/http.rs`): arbitrary bytes from a
//! client get one answer (or none when the client leaves), read within 4 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::admin::http::{answer, Reply, Routes};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Echo;

impl Routes for Echo {
    fn get(&self, path: &str) -> Reply {
        Reply::text(format!("{path}\n"))
    }
}

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::paused_runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let served = tokio::spawn(async move { answer(server, &Echo).await });
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut reply = Vec::new();
        let _ = client.read_to_end(&mut reply).await;
        let _ = served.await;
        if !reply.is_empty() {
            assert!(reply.starts_with(b"HTTP/1.1 "), "{reply:?}");
        }
    });
});
