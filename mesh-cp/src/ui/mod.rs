//! The dashboard at `/ui` on the status listener: one page (HTML, a script and a style sheet,
//! embedded in the binary: nothing to build or install) that reads `/status`, `/policies`,
//! `/explain` and `/ui/graph`.
//!
//! `/ui/graph` is the service graph ([`graph`]): the config's applications, the traffic between
//! them, read from Prometheus (`--prometheus`) or else from each connected node's metrics
//! endpoint (the port the node names, at the address its config stream comes from), and the
//! pairs a policy denies whatever happens.

pub mod graph;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::State,
    http::{header, HeaderName, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use mesh_telemetry::traffic::{self, scrape::Scrape, Pair};

use crate::state::Shared;

/// Traffic is read at most this often, however many pages ask: each read scrapes every node.
const READ_EVERY: Duration = Duration::from_secs(2);

/// Nodes mesh-cp scrapes itself at most; a larger mesh has a Prometheus for that.
const MAX_SCRAPED: usize = 256;

/// A reading of the traffic: when it was taken, the pairs, and where they came from.
type Reading = (Instant, Arc<Vec<Pair>>, graph::TrafficSource);

/// What the dashboard reads traffic from, and its last readings.
pub struct Dashboard {
    shared: Arc<Shared>,
    /// A Prometheus server's host:port, or none: the nodes are scraped.
    prometheus: Option<String>,
    /// The nodes' last scrape, rates are taken against it; held by the one request that reads
    /// (the others are answered from the last reading meanwhile).
    reader: Mutex<Option<Scrape>>,
    last: Mutex<Option<Reading>>,
    /// The denied pairs of one config version: evaluated once per version, not per request.
    denied: Mutex<Option<(u64, Arc<graph::DeniedPairs>)>>,
}

impl Dashboard {
    pub fn new(shared: Arc<Shared>, prometheus: Option<String>) -> Self {
        Self {
            shared,
            prometheus,
            reader: Mutex::new(None),
            last: Mutex::new(None),
            denied: Mutex::new(None),
        }
    }

    /// The last reading, if it is younger than `age`.
    fn last(&self, age: Duration) -> Option<(Arc<Vec<Pair>>, graph::TrafficSource)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (at, pairs, source) = last.as_ref()?;
        (at.elapsed() < age).then(|| (pairs.clone(), source.clone()))
    }

    /// The traffic between applications now: read again if the last reading is older than
    /// [`READ_EVERY`] by whichever request comes first, while the others get the last one.
    /// Blocking: scrapes and queries wait on the network.
    fn traffic(&self) -> (Arc<Vec<Pair>>, graph::TrafficSource) {
        if let Some(fresh) = self.last(READ_EVERY) {
            return fresh;
        }
        let mut reader = match self.reader.try_lock() {
            Ok(r) => r,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if let Some(any) = self.last(Duration::MAX) {
                    return any;
                }
                // The first reading: wait for it.
                let r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(fresh) = self.last(READ_EVERY) {
                    return fresh;
                }
                r
            }
        };
        let read_at = mesh_daemon::time::rfc3339(SystemTime::now());
        let (pairs, errors) = match &self.prometheus {
            Some(addr) => match traffic::prometheus::pairs(addr) {
                Ok(pairs) => (pairs, Vec::new()),
                Err(e) => (Vec::new(), vec![e.to_string()]),
            },
            None => {
                let nodes: Vec<String> = self.shared.with_nodes(|nodes| {
                    nodes
                        .values()
                        .filter(|n| n.streams > 0)
                        .filter_map(|n| n.metrics)
                        .map(|a| a.to_string())
                        .collect()
                });
                if nodes.len() > MAX_SCRAPED {
                    let why = format!(
                        "{} nodes are more than mesh-cp scrapes itself ({MAX_SCRAPED}): give mesh-cp serve --prometheus",
                        nodes.len()
                    );
                    *reader = None;
                    (Vec::new(), vec![why])
                } else {
                    let (now, failed) = Scrape::of_each(&nodes);
                    let pairs = now.rates_since(reader.as_ref());
                    *reader = Some(now);
                    let errors = failed
                        .iter()
                        .map(|(node, e)| format!("{node}: {e}"))
                        .collect();
                    (pairs, errors)
                }
            }
        };
        let source = graph::TrafficSource {
            from: if self.prometheus.is_some() {
                "prometheus"
            } else {
                "nodes"
            },
            read_at,
            errors,
        };
        let pairs = Arc::new(pairs);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), pairs.clone(), source.clone()));
        (pairs, source)
    }

    /// The denied pairs of `published`'s config, evaluated once per version.
    fn denied(&self, published: &crate::state::Published) -> Arc<graph::DeniedPairs> {
        let mut cached = self.denied.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((version, pairs)) if *version == published.version => pairs.clone(),
            _ => {
                let pairs = Arc::new(graph::denied_pairs(&published.config));
                *cached = Some((published.version, pairs.clone()));
                pairs
            }
        }
    }
}

/// The page and its data, for the status listener.
pub fn routes(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/ui", get(|| page(INDEX, "text/html; charset=utf-8")))
        .route("/ui/", get(|| page(INDEX, "text/html; charset=utf-8")))
        .route(
            "/ui/app.js",
            get(|| page(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/ui/style.css",
            get(|| page(STYLE, "text/css; charset=utf-8")),
        )
        .route("/ui/graph", get(graph_json))
        .with_state(dashboard)
}

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// The page's own files only, no inline script, no other origin: what the status endpoint
/// shows stays on it.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

async fn page(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (HeaderName::from_static("referrer-policy"), "no-referrer"),
        ],
        body,
    )
}

async fn graph_json(
    State(dashboard): State<Arc<Dashboard>>,
) -> Result<Json<graph::Graph>, (StatusCode, String)> {
    let published = dashboard.shared.config.borrow().clone();
    tokio::task::spawn_blocking(move || {
        let (pairs, source) = dashboard.traffic();
        let denied = dashboard.denied(&published);
        graph::build(
            &published.config,
            published.version,
            &pairs,
            &denied,
            source,
        )
    })
    .await
    .map(Json)
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))
}
