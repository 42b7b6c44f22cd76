//! The endpoints' routes and answers: status, content type and body as the tests and
//! operators read them.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header::CONTENT_TYPE, HeaderName, StatusCode},
    routing::get,
    Router,
};

use super::{debug, Admin};
use crate::metrics::{self, Metrics};

/// `/metrics`, and `/healthz` for probes that only reach this port.
pub(super) fn metrics(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(metrics)
}

pub(super) fn admin(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/debug/config", get(debug_config))
        .route("/debug/certs", get(debug_certs))
        .route("/debug/connections", get(debug_connections))
        .fallback(not_found)
        .with_state(admin)
}

type Answer = (StatusCode, [(HeaderName, &'static str); 1], String);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    (status, [(CONTENT_TYPE, content_type)], body)
}

async fn healthz() -> Answer {
    answer(StatusCode::OK, TEXT, "ok\n".into())
}

async fn not_found() -> Answer {
    answer(StatusCode::NOT_FOUND, TEXT, "not found\n".into())
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Answer {
    match admin.readiness() {
        Ok(()) => answer(StatusCode::OK, TEXT, "ready\n".into()),
        Err(why) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready: {why}\n"),
        ),
    }
}

/// What the endpoints that need the attached programs answer before they are.
fn starting() -> Answer {
    answer(
        StatusCode::SERVICE_UNAVAILABLE,
        TEXT,
        "starting: the eBPF programs are not attached yet\n".into(),
    )
}

async fn debug_config(State(admin): State<Arc<Admin>>) -> Answer {
    let Some(parts) = admin.parts.get() else {
        return starting();
    };
    let status = admin.status.borrow().clone();
    answer(StatusCode::OK, JSON, debug::config(parts, &status))
}

async fn debug_certs(State(admin): State<Arc<Admin>>) -> Answer {
    let Some(parts) = admin.parts.get() else {
        return starting();
    };
    answer(StatusCode::OK, JSON, debug::certs(parts))
}

async fn debug_connections(State(admin): State<Arc<Admin>>) -> Answer {
    let Some(parts) = admin.parts.get() else {
        return starting();
    };
    answer(StatusCode::OK, JSON, debug::connections(parts))
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> Answer {
    match metrics.render() {
        Ok(body) => answer(StatusCode::OK, metrics::CONTENT_TYPE, body),
        Err(e) => answer(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
    }
}
