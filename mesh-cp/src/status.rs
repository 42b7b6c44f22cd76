//! The HTTP status endpoint: `/healthz`, and `/status` with the config in force, the last config
//! error, and each node's stream and acknowledged version (JSON).

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use crate::state::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
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
        "trust_domain": published.config.mesh.trust_domain,
        "nodes": shared.nodes(),
    }))
}
