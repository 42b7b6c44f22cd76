//! The HTTP endpoints. Status (`--http-listen`, loopback by default): `/healthz`, `/readyz`
//! (the config loaded and the gRPC API serving), `/status` with the config in force, the last
//! config error, and each node's streams, acknowledged version, workloads and certificates
//! (JSON), `/policies` (each AccessPolicy and what it selects), `/explain` (the JSON of
//! `mesh-cp explain`, evaluated on the config in force), `/debug/nodes` and `/debug/config`.
//! `mycel` reads these; `/ui` is the dashboard on them (`ui/`). Metrics (`--metrics-listen`): `/metrics`, and `/healthz` and `/readyz` again
//! for the kubelet's probes, which cannot reach the pod's loopback.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::state::Shared;

/// Serves the status endpoints and the dashboard on `listener`, to requests that name it by
/// an address, `localhost` or one of `names` (the serving certificate's).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    dashboard: Arc<crate::ui::Dashboard>,
    names: Vec<String>,
) {
    let names: Arc<[String]> = names.into();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/explain", get(explain))
        .route("/policies", get(policies))
        .route("/debug/nodes", get(debug_nodes))
        .route("/debug/config", get(debug_config))
        .with_state(shared)
        .merge(crate::ui::routes(dashboard))
        .layer(axum::middleware::from_fn(move |req, next| {
            known_host(names.clone(), req, next)
        }));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "status endpoint stopped");
    }
}

/// Refuses a request whose `Host` is a name this control plane does not have: a web page
/// elsewhere that rebinds its own name to this loopback address must not read the mesh
/// through a browser on this host. An address, `localhost` and the serving certificate's names
/// are taken; a request without `Host` (not a browser's) is too. Refuses, as well, what a
/// browser marks as coming from another site's page.
async fn known_host(
    names: Arc<[String]>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{0}"));
    // A browser says where a request comes from: a page of another site (which may still
    // name this host by its address) reads nothing, and makes mesh-cp do no work.
    let cross_site = req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site" || v.as_bytes() == b"same-site");
    match host {
        Some(h) if !host_is_ours(h, &names) => (
            StatusCode::MISDIRECTED_REQUEST,
            "this host name is not one of mesh-cp's: use its address, localhost, or a --server-name\n",
        )
            .into_response(),
        _ if cross_site => (
            StatusCode::FORBIDDEN,
            "requests from another site's page are refused\n",
        )
            .into_response(),
        _ => next.run(req).await,
    }
}

/// Whether `host` (a `Host` header: a name or address, with or without a port) names this
/// control plane.
fn host_is_ours(host: &str, names: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Serves `/metrics` on its own listener, for the scraper, with the probes.
pub async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

async fn metrics(
    State(shared): State<Arc<Shared>>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), (StatusCode, String)> {
    let body = shared
        .metrics
        .render()
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    ))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if *shared.stopping.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
    } else if shared.store().is_some_and(|s| !s.reachable) {
        // Nodes are still served, the last config: but a change made now would not reach
        // them through this replica, and a balancer should send them to one that has it.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: etcd does not answer; the last config stays in force\n",
        )
    } else if shared.serving.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the gRPC API is not serving yet\n",
        )
    }
}

async fn debug_nodes(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let published = shared.config.borrow().clone();
    Json(json!({
        "config_version": published.version,
        "nodes": nodes(&shared, &published.config),
    }))
}

/// Each node that has connected or has workloads placed on it: its streams, the version it
/// holds, how many workloads the config places on it, and when the earliest of the
/// certificates issued for them expires. Built under the nodes' lock, without copying them.
fn nodes(
    shared: &Shared,
    config: &mesh_model::Config,
) -> serde_json::Map<String, serde_json::Value> {
    let mut placed: BTreeMap<&str, Vec<mesh_model::SpiffeId>> = BTreeMap::new();
    for w in config.workloads.values() {
        placed
            .entry(w.node.as_str())
            .or_default()
            .push(w.identity(&config.mesh.trust_domain));
    }
    let none = crate::state::NodeStatus::default();
    shared.with_nodes(|known| {
        let names: std::collections::BTreeSet<&str> = known
            .keys()
            .map(String::as_str)
            .chain(placed.keys().copied())
            .collect();
        names
            .into_iter()
            .map(|name| {
                let status = known.get(name).unwrap_or(&none);
                let identities = placed.get(name).map(Vec::as_slice).unwrap_or(&[]);
                let held: Vec<std::time::SystemTime> = identities
                    .iter()
                    .filter_map(|id| status.certificates.get(id).copied())
                    .collect();
                let mut v = json!(status);
                v["workloads"] = json!(identities.len());
                v["certificates"] = json!(held.len());
                v["certificates_expire"] =
                    json!(held.iter().min().copied().map(mesh_daemon::time::rfc3339));
                (name.to_owned(), v)
            })
            .collect()
    })
}

/// Each AccessPolicy in force and the workloads it selects.
async fn policies(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let published = shared.config.borrow().clone();
    let c = &published.config;
    let policies: Vec<serde_json::Value> = c
        .policies
        .values()
        .map(|p| {
            let selects: Vec<String> = c.selected_by(p).map(|w| w.key.to_string()).collect();
            json!({
                "key": p.key.to_string(),
                "action": p.action,
                "mode": p.mode,
                "rules": p.rules.len(),
                "mesh_wide": p.key.namespace == c.mesh.root_namespace,
                "selects": selects,
            })
        })
        .collect();
    Json(json!({ "config_version": published.version, "policies": policies }))
}

/// The config in force, as the control plane holds it.
async fn debug_config(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let published = shared.config.borrow().clone();
    let c = &published.config;
    let key = |k: &mesh_model::ObjectKey| k.to_string();
    let workloads: serde_json::Map<String, serde_json::Value> = c
        .workloads
        .values()
        .map(|w| {
            (
                key(&w.key),
                json!({
                    "node": w.node,
                    "identity": w.identity(&c.mesh.trust_domain).to_string(),
                    "addresses": w.addresses,
                    "labels": w.labels,
                    "netns": w.netns,
                }),
            )
        })
        .collect();
    let services: serde_json::Map<String, serde_json::Value> = c
        .services
        .values()
        .map(|s| {
            let ports: Vec<_> = s
                .ports
                .iter()
                .map(|p| json!({"name": p.name, "port": p.port, "target_port": p.target_port, "app_protocol": p.app_protocol.map(|a| a.to_string())}))
                .collect();
            (
                key(&s.key),
                json!({ "vips": s.vips, "ports": ports, "selector": s.selector }),
            )
        })
        .collect();
    let policies: serde_json::Map<String, serde_json::Value> =
        c.policies.iter().map(|(k, p)| (key(k), json!(p))).collect();
    Json(json!({
        "version": published.version,
        "status": shared.config_status(),
        "mesh": {
            "trust_domain": c.mesh.trust_domain,
            "cert_ttl_seconds": c.mesh.cert_ttl.as_secs(),
            "default_action": c.mesh.default_action,
            "root_namespace": c.mesh.root_namespace,
            "mtls": c.mesh.mtls,
            "plaintext_ports": c.mesh.plaintext_ports,
            "transport": c.mesh.transport,
        },
        "workloads": workloads,
        "services": services,
        "policies": policies,
    }))
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let published = shared.config.borrow().clone();
    Json(json!({
        "config": shared.config_status(),
        "workloads": published.config.workloads.len(),
        "services": published.config.services.len(),
        "policies": published.config.policies.len(),
        "default_action": published.config.mesh.default_action,
        "mtls": published.config.mesh.mtls,
        "transport": published.config.mesh.transport,
        "trust_domain": published.config.mesh.trust_domain,
        "cert_ttl_seconds": published.config.mesh.cert_ttl.as_secs(),
        "ca_expires": shared.ca.root_not_after().map(mesh_daemon::time::rfc3339),
        "started_at": mesh_daemon::time::rfc3339(shared.started_at),
        "config_source": shared.config_source,
        "store": shared.store(),
        "leader": shared.leads(),
        "nodes": nodes(&shared, &published.config),
    }))
}

#[derive(Deserialize)]
struct ExplainQuery {
    from: Option<String>,
    from_address: Option<std::net::IpAddr>,
    to: String,
    port: u16,
}

async fn explain(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<ExplainQuery>,
) -> Result<Json<crate::explain::Explanation>, (StatusCode, String)> {
    let bad = |e: crate::explain::ExplainError| (StatusCode::BAD_REQUEST, format!("{e}\n"));
    let from = match (&q.from, q.from_address) {
        (Some(key), None) => {
            crate::explain::Client::Workload(crate::explain::parse_key(key).map_err(bad)?)
        }
        (None, Some(ip)) => crate::explain::Client::Address(ip),
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                "give exactly one of from and from_address\n".into(),
            ))
        }
    };
    let to = crate::explain::parse_key(&q.to).map_err(bad)?;
    let published = shared.config.borrow().clone();
    crate::explain::explain(&published.config, &from, &to, q.port)
        .map(Json)
        .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_its_own_names_and_addresses_are_hosts() {
        let names = ["mycel-cp.mycel-system.svc".to_owned()];
        for ours in [
            "127.0.0.1:15014",
            "127.0.0.1",
            "[::1]:15014",
            "localhost:15014",
            "LOCALHOST",
            "mycel-cp.mycel-system.svc:15014",
        ] {
            assert!(host_is_ours(ours, &names), "{ours}");
        }
        for theirs in [
            "attacker.example:15014",
            "attacker.example",
            "127.0.0.1.attacker.example",
            "[evil]:1",
            "",
        ] {
            assert!(!host_is_ours(theirs, &names), "{theirs}");
        }
    }
}
