//! What an endpoint answers `mycel`: the HTTP answer (`mesh_telemetry::client::parse_answer`), its
//! body as a Prometheus exposition (a node's `/metrics`, the text `mycel stat` reads), and as
//! mesh-cp's `/status` and `/policies`, rendered as their tables and judged by `mycel check`.
//! Any bytes are refused or shown, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((_code, body)) = mesh_telemetry::client::parse_answer(data) else {
        return;
    };
    if let Ok(e) = mesh_telemetry::exposition::Exposition::parse(&body) {
        let _ = e.sum(
            "mycel_tcp_connections_opened_total",
            &[("reporter", "source")],
        );
    }
    if let Ok(status) = serde_json::from_str::<mycel::status::Status>(&body) {
        let _ = mycel::status::render(&status);
        let findings = mycel::check::mesh::findings(&status, std::time::SystemTime::now());
        let _ = mycel::check::render(&findings);
    }
    if let Ok(policies) = serde_json::from_str::<mycel::policies::Policies>(&body) {
        let _ = mycel::policies::render(&policies);
    }
});
