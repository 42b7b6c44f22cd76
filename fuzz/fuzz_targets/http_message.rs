//! What an application sends to a port that declares HTTP, through hyper's server (HTTP/1.1,
//! or HTTP/2 with prior knowledge) into what the proxy changes in a message
//! (`proxy/http/headers.rs`): the h2c refusal, the upgrade test, the request as an endpoint
//! gets it, and an endpoint's answer made of the same headers as the client gets it. Nothing
//! may panic; an answer never carries the mesh's error header or a hop-by-hop header, and a
//! request for an HTTP/1.1 endpoint is HTTP/1.1 with an origin-form target. The clock is
//! paused, so a connection that waits for more input ends at once.
#![no_main]

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{body::Incoming, header, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::{paused_runtime, Input};
use mesh_node::proxy::http::{headers, MESH_ERROR};
use tokio::io::AsyncWriteExt as _;

async fn handle(
    mut req: Request<Incoming>,
    h2_upstream: bool,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    headers::refuse_h2c_upgrade(&mut req);
    let upgrade = headers::is_upgrade(&req);
    let (mut parts, _body) = req.into_parts();
    let answer = headers::clone_parts(&parts).headers;
    let fit = headers::to_upstream(&mut parts, upgrade, h2_upstream).is_ok();
    if fit && !h2_upstream {
        assert_ne!(parts.version, Version::HTTP_2);
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        assert!(target.starts_with('/') || target == "*" || parts.method == hyper::Method::CONNECT);
    }
    if !upgrade {
        assert!(!parts.headers.contains_key(header::CONNECTION));
    }
    let mut response = Response::new(Empty::new());
    *response.headers_mut() = answer;
    headers::from_endpoint(response.headers_mut());
    let h = response.headers();
    assert!(!h.contains_key(MESH_ERROR) && !h.contains_key(header::CONNECTION));
    assert!(!h.contains_key(header::TRANSFER_ENCODING) && !h.contains_key(header::UPGRADE));
    Ok(response)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.byte();
    let (h2, h2_upstream) = (flags & 1 == 1, flags & 2 == 2);
    let bytes = input.0.to_vec();
    paused_runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service =
            hyper::service::service_fn(move |req| async move { handle(req, h2_upstream).await });
        let io = TokioIo::new(server);
        let serve = async move {
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(1))
                    .serve_connection(io, service)
                    .await;
            }
        };
        let send = async move {
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            // Read what comes back until the server ends, so it is never stuck writing.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(serve, send) }).await;
    });
});
