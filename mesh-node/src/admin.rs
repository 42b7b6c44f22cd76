//! The daemon's HTTP endpoints. Admin (localhost by default): `GET /stats` (counters as
//! `name value` lines), `GET /certs` (the workload certificates held) and `GET /healthz`.
//! Metrics (`--metrics-listen`): `GET /metrics` in Prometheus's text format.

use std::{fmt::Write as _, net::SocketAddr, sync::atomic::Ordering, sync::Arc, time::Duration};

use mesh_ebpf_common::Counter;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    capture::Capture,
    identity::SvidStore,
    proxy::{authz::Authz, ProxyStats},
};

/// State the daemon publishes for the admin endpoint.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub enrolled: usize,
    pub config_errors: u64,
    pub config_applied: u64,
    /// Version of the control plane's config in force (0 in offline mode or before the first).
    pub config_version: u64,
    pub cp_connected: bool,
    /// When the last config update arrived (or, offline, the workloads file was applied).
    pub config_updated_at: Option<std::time::SystemTime>,
}

pub struct Admin {
    pub capture: Arc<Capture>,
    pub stats: Arc<ProxyStats>,
    pub authz: Arc<Authz>,
    pub svids: Arc<SvidStore>,
    pub status: watch::Receiver<Status>,
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// An HTTP/1.1 endpoint's answers to `GET`s.
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Reply;
}

pub struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: "200 OK",
            content_type,
            body,
        }
    }

    pub fn text(body: String) -> Self {
        Self::ok(TEXT, body)
    }

    pub fn not_found() -> Self {
        Self {
            status: "404 Not Found",
            content_type: TEXT,
            body: "not found\n".into(),
        }
    }

    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            status: "500 Internal Server Error",
            content_type: TEXT,
            body: format!("{e}\n"),
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Answers requests on `listener` with `routes`, one short-lived task per connection.
pub async fn serve<R: Routes>(listener: TcpListener, routes: Arc<R>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &*routes)).await;
        });
    }
}

async fn answer<R: Routes>(mut stream: TcpStream, routes: &R) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            let reply = Reply {
                status: "431 Request Header Fields Too Large",
                content_type: TEXT,
                body: String::new(),
            };
            return respond(&mut stream, reply).await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let reply = match method {
        "GET" => routes.get(path),
        _ => Reply {
            status: "405 Method Not Allowed",
            content_type: TEXT,
            body: String::new(),
        },
    };
    respond(&mut stream, reply).await
}

async fn respond(stream: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}

impl Routes for Admin {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/healthz" => Reply::text("ok\n".into()),
            "/stats" => match render_stats(self) {
                Ok(body) => Reply::text(body),
                Err(e) => Reply::error(e),
            },
            "/certs" => Reply::text(render_certs(self)),
            _ => Reply::not_found(),
        }
    }
}

/// The Prometheus endpoint: `/metrics`, and `/healthz` for probes that only reach this port.
pub struct MetricsEndpoint(pub Arc<crate::metrics::Metrics>);

impl Routes for MetricsEndpoint {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/metrics" => match self.0.render() {
                Ok(body) => Reply::ok(crate::metrics::CONTENT_TYPE, body),
                Err(e) => Reply::error(e),
            },
            "/healthz" => Reply::text("ok\n".into()),
            _ => Reply::not_found(),
        }
    }
}

/// One line per certificate held: identity, serial, expiry and renewal (Unix seconds), and the
/// number of certificates in the chain presented.
fn render_certs(admin: &Admin) -> String {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let mut out = String::new();
    for svid in admin.svids.all() {
        let _ = writeln!(
            out,
            "{} serial={} not_after={} renew_at={} chain={}",
            svid.identity,
            svid.serial,
            unix(svid.not_after),
            unix(svid.renew_at),
            svid.certified.cert.len()
        );
    }
    out
}

fn render_stats(admin: &Admin) -> Result<String, crate::capture::CaptureError> {
    let mut out = String::new();
    let counters = admin.capture.counters()?;
    for c in Counter::ALL {
        let _ = writeln!(out, "ebpf_{} {}", c.name(), counters.get(c));
    }
    let (by_cookie, by_tuple) = admin.capture.orig_dst_entries();
    let _ = writeln!(out, "orig_dst_entries_by_cookie {by_cookie}");
    let _ = writeln!(out, "orig_dst_entries_by_tuple {by_tuple}");
    let _ = writeln!(
        out,
        "fast_deny_entries {}",
        admin.capture.fast_deny_entries()
    );
    let s = &admin.stats;
    for (name, v) in [
        ("proxy_accepted", &s.accepted),
        ("proxy_forwarded", &s.forwarded),
        ("proxy_no_orig_dst", &s.no_orig_dst),
        ("proxy_upstream_failed", &s.upstream_failed),
        ("proxy_reset", &s.reset),
        ("proxy_bytes_sent", &s.bytes_sent),
        ("proxy_bytes_received", &s.bytes_received),
        ("proxy_passthrough", &s.passthrough),
        ("proxy_same_node", &s.same_node),
        ("proxy_no_endpoint", &s.no_endpoint),
        ("tunnels_out", &s.tunnels_out),
        ("tunnels_reused", &s.tunnels_reused),
        ("tunnels_quic", &s.tunnels_quic),
        ("quic_connections_out", &s.quic_connections_out),
        ("quic_connections_in", &s.quic_connections_in),
        ("tunnels_out_failed", &s.tunnels_out_failed),
        ("tunnels_in", &s.tunnels_in),
        ("tunnels_in_refused", &s.tunnels_in_refused),
        ("plaintext_in", &s.plaintext_in),
        ("plaintext_denied", &s.plaintext_denied),
    ] {
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    admin.authz.render(&mut out);
    let status = admin.status.borrow().clone();
    let _ = writeln!(out, "enrolled_workloads {}", status.enrolled);
    let _ = writeln!(out, "config_applied {}", status.config_applied);
    let _ = writeln!(out, "config_errors {}", status.config_errors);
    let _ = writeln!(out, "config_version {}", status.config_version);
    let _ = writeln!(out, "cp_connected {}", u8::from(status.cp_connected));
    let svid = admin.svids.stats();
    let _ = writeln!(out, "svids {}", admin.svids.len());
    let _ = writeln!(out, "svids_issued {}", svid.issued);
    let _ = writeln!(out, "svid_errors {}", svid.errors);
    Ok(out)
}
