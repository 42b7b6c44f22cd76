//! The Kubernetes config source (`mesh-cp serve --kubernetes`): a thin adapter that watches
//! the API and hands the control plane the same [`mesh_model::Config`] a config dir gives.
//! Everything behind it (node streams, certificates, fast-deny sets, explain) is the code
//! universal mode runs.
//!
//! - `watch.rs`: one reflector per kind, retried with backoff;
//! - `translate.rs`: the objects into the model (who is in the mesh, services, policies);
//! - `policy_status.rs`: each AccessPolicy's `Accepted` condition and selected workloads;
//! - this file: the first complete snapshot, then a new version on every change.

pub mod policy_status;
pub mod translate;
pub mod watch;

use std::{sync::Arc, time::Duration};

use kube::Client;
use tokio::sync::{watch as channel, Notify};

use crate::state::{publish_if_changed, ConfigStatus, Published, Shared};
use translate::Translated;
use watch::{ApiHealth, Retry, Stores};

/// A burst of events (a rollout) becomes one new version.
const SETTLE: Duration = Duration::from_millis(100);
/// How often statuses that could not be written are tried again.
const STATUS_RETRY: Duration = Duration::from_secs(10);

/// The watches, once every kind has been listed.
pub struct Source {
    client: Client,
    stores: Stores,
    changed: Arc<Notify>,
    /// The watches' last error, while they fail.
    pub health: Arc<ApiHealth>,
}

impl Source {
    /// Starts the watches and waits for the first complete list of every kind: serving an
    /// empty mesh before that would unenroll every pod of every node.
    pub async fn start(client: Client, retry: Retry) -> Self {
        let changed = Arc::new(Notify::new());
        let health = Arc::new(ApiHealth::default());
        let stores = watch::start(&client, retry, changed.clone(), health.clone());
        stores.ready().await;
        Self {
            client,
            stores,
            changed,
            health,
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Every pod as last seen: node authentication finds a token's pod here.
    pub fn pods(&self) -> kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod> {
        self.stores.pods()
    }

    pub fn translate(&self, previous: &mesh_model::MeshConfig) -> Translated {
        translate::translate(&self.stores.objects(), previous)
    }
}

/// Publishes a new version whenever the watched objects change what the mesh is, and keeps
/// the AccessPolicies' statuses in step. `first` is what was published at start.
pub async fn follow(
    source: Source,
    first: Translated,
    publish: channel::Sender<Published>,
    shared: Arc<Shared>,
) {
    let statuses = policy_status::Writer::new(source.client.clone());
    let mut last_problems = Vec::new();
    let mut translated = first;
    loop {
        let api_error = source.health.last_error();
        report(
            &shared,
            &publish,
            &translated.problems,
            api_error,
            &mut last_problems,
        );
        statuses
            .write(&source.stores.objects().policies, &translated.policies)
            .await;
        tokio::select! {
            () = source.changed.notified() => tokio::time::sleep(SETTLE).await,
            () = tokio::time::sleep(STATUS_RETRY) => {}
        }
        let previous = publish.borrow().config.mesh.clone();
        translated = source.translate(&previous);
        publish_if_changed(&publish, translated.config.clone());
    }
}

/// Logs what was left out once per change of it, and shows it on `/status` with the watch
/// error while the API is away (the mesh then keeps its last state).
fn report(
    shared: &Shared,
    publish: &channel::Sender<Published>,
    problems: &[String],
    api_error: Option<String>,
    last: &mut Vec<String>,
) {
    if problems != last.as_slice() {
        for p in problems.iter().filter(|p| !last.contains(p)) {
            tracing::warn!("{p}");
            shared.metrics.config_rejected();
        }
        *last = problems.to_vec();
    }
    let version = publish.borrow().version;
    let api = api_error.map(|e| format!("Kubernetes API unreachable, last state kept: {e}"));
    let all: Vec<String> = api.into_iter().chain(problems.iter().cloned()).collect();
    shared.set_config_status(ConfigStatus {
        error: (!all.is_empty()).then(|| all.join("; ")),
        ..ConfigStatus::ok(version)
    });
}

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod tests;
