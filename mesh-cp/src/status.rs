//! The HTTP status endpoint: `/healthz`, `/status` with the config in force, the last config
//! error, and each node's stream and acknowledged version (JSON), and `/explain` (the JSON of
//! `mesh-cp explain`, evaluated on the config in force).

use std::sync::Arc;

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

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/explain", get(explain))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "status endpoint stopped");
    }
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
        "nodes": shared.nodes(),
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
