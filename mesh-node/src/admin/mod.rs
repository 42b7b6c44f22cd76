//! The daemon's HTTP endpoints. Admin (`--admin-listen`, loopback by default): `/healthz`,
//! `/readyz` (ready once the eBPF programs are attached and, in connected mode, every enrolled
//! workload has its certificate), `/stats` (counters as `name value` lines), `/debug/config`,
//! `/debug/certs`, `/debug/connections` (JSON). Metrics (`--metrics-listen`): `/metrics`.

mod debug;
pub mod http;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, OnceLock},
};

use mesh_ebpf_common::Counter;
use tokio::{net::TcpListener, sync::watch};

pub use http::{serve, Reply, Routes};

use crate::{
    capture::Capture,
    control::MeshView,
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
    /// Following a control plane (certificates needed), not a workloads file.
    pub connected_mode: bool,
}

/// What the admin endpoint reads. It answers from the daemon's start; the parts that exist
/// only once the eBPF programs are attached arrive then.
pub struct Admin {
    status: watch::Receiver<Status>,
    parts: OnceLock<Parts>,
}

pub struct Parts {
    pub capture: Arc<Capture>,
    pub stats: Arc<ProxyStats>,
    pub authz: Arc<Authz>,
    pub svids: Arc<SvidStore>,
    /// The control plane's config as this node holds it (empty offline).
    pub view: watch::Receiver<Arc<MeshView>>,
    /// Which pods are enrolled here.
    pub proxy: Arc<crate::proxy::Shared>,
}

impl Admin {
    pub fn new(status: watch::Receiver<Status>) -> Self {
        Self {
            status,
            parts: OnceLock::new(),
        }
    }

    /// The eBPF programs are attached: the rest of the endpoints can answer.
    pub fn attached(&self, parts: Parts) {
        let _ = self.parts.set(parts);
    }

    /// Ok when ready, else why not.
    fn readiness(&self) -> Result<(), String> {
        let Some(parts) = self.parts.get() else {
            return Err("the eBPF programs are not attached yet".into());
        };
        let status = self.status.borrow().clone();
        if !status.connected_mode {
            return if status.config_applied > 0 {
                Ok(())
            } else {
                Err("the workloads file is not applied yet".into())
            };
        }
        if status.config_version == 0 {
            return Err("no config from the control plane yet".into());
        }
        let view = parts.view.borrow().clone();
        let missing: Vec<&str> = view
            .workloads
            .values()
            .filter(|w| !w.netns.is_empty())
            .map(|w| w.identity.as_str())
            .filter(|id| parts.svids.get(id).is_none())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("no certificate yet for {}", missing.join(", ")))
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

const JSON: &str = "application/json";

impl Routes for Admin {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/healthz" => return Reply::text("ok\n".into()),
            "/readyz" => {
                return match self.readiness() {
                    Ok(()) => Reply::text("ready\n".into()),
                    Err(why) => Reply::unavailable(format!("not ready: {why}\n")),
                }
            }
            _ => {}
        }
        let Some(parts) = self.parts.get() else {
            return Reply::unavailable("starting: the eBPF programs are not attached yet\n".into());
        };
        match path {
            "/stats" => match render_stats(parts, &self.status.borrow().clone()) {
                Ok(body) => Reply::text(body),
                Err(e) => Reply::error(e),
            },
            "/debug/config" => Reply::ok(JSON, debug::config(parts, &self.status.borrow().clone())),
            "/debug/certs" => Reply::ok(JSON, debug::certs(parts)),
            "/debug/connections" => Reply::ok(JSON, debug::connections(parts)),
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

fn render_stats(admin: &Parts, status: &Status) -> Result<String, crate::capture::CaptureError> {
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
    let (open, handshakes) = admin.proxy.limits.totals();
    let _ = writeln!(out, "inbound_open {open}");
    let _ = writeln!(out, "inbound_handshakes {handshakes}");
    admin.authz.render(&mut out);
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
