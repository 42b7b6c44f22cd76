//! The daemon's HTTP endpoints. Admin (`--admin-listen`, loopback by default): `/healthz`,
//! `/readyz` (ready once the eBPF programs are attached and, in connected mode, every enrolled
//! workload has its certificate), `/debug/config`, `/debug/certs`, `/debug/connections`
//! (JSON). Metrics (`--metrics-listen`): `/metrics`, the node's one set of counters.
//! Both are axum routers on the server in `server.rs`, which holds a stranger to its limits.

mod debug;
mod routes;
mod server;
#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use mesh_ebpf_common::Counter;
use tokio::{net::TcpListener, sync::watch};

use crate::{control::MeshView, identity::SvidStore, metrics::collect::Figures};

/// State the daemon publishes for the admin endpoint.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub enrolled: usize,
    /// Enrolled pods whose applications see their own pod address for every client.
    pub without_client_address: usize,
    pub config_errors: u64,
    pub config_applied: u64,
    /// Version of the control plane's config in force (0 in offline mode or before the first).
    pub config_version: u64,
    pub cp_connected: bool,
    /// When the last config update arrived (or, offline, the workloads file was applied).
    pub config_updated_at: Option<std::time::SystemTime>,
    /// Following a control plane (certificates needed), not a workloads file.
    pub connected_mode: bool,
    /// Where the daemon is in a handoff; ready only when in none.
    pub handoff: HandoffState,
    /// The last set of workloads applied was applied whole, and is complete (in Kubernetes,
    /// this node's pods were listed).
    pub set_complete: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HandoffState {
    #[default]
    None,
    /// Starting up on the sockets of the daemon it takes over from.
    TakingOver,
    /// A new daemon is starting up on this one's sockets, or has taken over.
    HandingOver,
}

/// What the admin endpoint reads. It answers from the daemon's start; the parts that exist
/// only once the eBPF programs are attached arrive then.
pub struct Admin {
    status: watch::Receiver<Status>,
    parts: OnceLock<Parts>,
}

#[derive(Clone)]
pub struct Parts {
    pub svids: Arc<SvidStore>,
    /// The control plane's config as this node holds it (empty offline).
    pub view: watch::Receiver<Arc<MeshView>>,
    /// The proxy's shared state: the capture's maps, policy decisions and open connections,
    /// which pods are enrolled here, the limits' counts.
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
        match self.status.borrow().handoff {
            HandoffState::None => {}
            HandoffState::TakingOver => return Err("taking over from the running mesh-node".into()),
            HandoffState::HandingOver => return Err("handing over to a new mesh-node".into()),
        }
        self.up()
    }

    /// Whether a daemon taking over is up enough to tell the old one to stop: up, and every
    /// pod it should capture captured (the old daemon stops accepting for all of them).
    pub fn up_for_takeover(&self) -> Result<(), String> {
        self.up()?;
        if !self.status.borrow().set_complete {
            return Err("the workloads are not all enrolled yet".into());
        }
        // `up` checks the workloads the control plane gives a netns; in Kubernetes it gives
        // none (the node finds them), so check every enrolled pod here: the old daemon stops
        // accepting for all of them.
        let Some(parts) = self.parts.get() else {
            return Err("the eBPF programs are not attached yet".into());
        };
        if !self.status.borrow().connected_mode {
            return Ok(());
        }
        let view = parts.view.borrow().clone();
        let enrolled = view
            .workloads
            .iter()
            .filter(|(id, _)| parts.proxy.local.get(id).is_some())
            .map(|(_, w)| w);
        certificates_for(parts, enrolled)
    }

    /// Whether the daemon is up: its programs attached, its config applied, a certificate for
    /// each of its workloads.
    pub fn up(&self) -> Result<(), String> {
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
        let placed_here = view.workloads.values().filter(|w| !w.netns.is_empty());
        certificates_for(parts, placed_here)
    }
}

/// Whether each of `workloads` has its certificate; else which do not, by identity.
fn certificates_for<'a>(
    parts: &Parts,
    workloads: impl Iterator<Item = &'a mesh_api::v1::Workload>,
) -> Result<(), String> {
    let missing: Vec<&str> = workloads
        .map(|w| w.identity.as_str())
        .filter(|id| parts.svids.get(id).is_none())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("no certificate yet for {}", missing.join(", ")))
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the admin endpoint on `listener` until the process ends.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    server::serve(listener, routes::admin(admin), server::Limits::default()).await;
}

/// Serves `/metrics`, and `/healthz` for probes that only reach this port, on `listener`.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<crate::metrics::Metrics>) {
    server::serve(
        listener,
        routes::metrics(metrics),
        server::Limits::default(),
    )
    .await;
}

impl Parts {
    /// What the metrics read at a scrape (`metrics/collect.rs`), with `status` as it is.
    pub fn figures(&self, status: &Status) -> Figures {
        let ebpf_events = match self.proxy.capture.counters() {
            Ok(counters) => Some(Counter::ALL.map(|c| (c.name(), counters.get(c))).to_vec()),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the eBPF counters");
                None
            }
        };
        let (by_cookie, by_tuple) = self.proxy.capture.orig_dst_entries();
        let (inbound_open, inbound_handshakes) = self.proxy.limits.totals();
        let svid_stats = self.svids.stats();
        Figures {
            ebpf_events,
            map_entries: vec![
                ("orig_dst_by_cookie", by_cookie),
                ("orig_dst_by_tuple", by_tuple),
                ("fast_deny", self.proxy.capture.fast_deny_entries()),
            ],
            decisions: self
                .proxy
                .authz
                .decision_counts()
                .into_iter()
                .map(|((policy, rule, action, mode), n)| {
                    ([policy, rule, action.to_string(), mode.to_string()], n)
                })
                .collect(),
            closed_by_policy: self.proxy.authz.closed_by_policy(),
            certificates: self
                .svids
                .all()
                .iter()
                .map(|s| (s.identity.clone(), s.serial.clone(), s.not_after))
                .collect(),
            certificates_issued: svid_stats.issued,
            certificate_errors: svid_stats.errors,
            trust_roots: self.view.borrow().trust_roots.clone(),
            config_updated_at: status.config_updated_at,
            config_version: status.config_version,
            config_applied: status.config_applied,
            config_errors: status.config_errors,
            cp_connected: status.cp_connected,
            enrolled: status.enrolled,
            without_client_address: status.without_client_address,
            inbound_open,
            inbound_handshakes,
            ejected: self.proxy.traffic.ejected(),
        }
    }
}
