//! The Kubernetes config source (`mesh-cp serve --kubernetes`): a thin adapter that watches
//! the API and hands the control plane the same [`mesh_model::Config`] a config dir gives.
//! Everything behind it (node streams, certificates, fast-deny sets, explain) is the code
//! universal mode runs.
//!
//! - `watch.rs`: one reflector per kind, retried with backoff;
//! - `translate.rs`: the objects into the model (who is in the mesh, services, policies,
//!   routes);
//! - `status.rs`: the `Accepted` condition of each AccessPolicy, TrafficPolicy and
//!   ServiceRoute, with the workloads or Services it applies to;
//! - `leader.rs`: Lease election; the leader creates the CA Secret, keeps the trust bundle
//!   and writes those statuses, while every replica serves nodes;
//! - `ca_secret.rs`: the CA from its Secret, the trust bundle ConfigMap;
//! - this file: start-up in a cluster, then a new version on every change.

pub mod ca_secret;
pub mod leader;
pub mod status;
pub mod translate;
pub mod watch;

use std::{sync::Arc, time::Duration};

use kube::Client;
use tokio::sync::{watch as channel, Notify};

use crate::{
    ca::Ca,
    node_auth::{NodeAuth, TokenReviewer},
    state::{publish_if_changed, ConfigStatus, Published, Shared},
};
use translate::Translated;
use watch::{ApiHealth, Retry, Stores};

/// A burst of events (a rollout) becomes one new version.
const SETTLE: Duration = Duration::from_millis(100);
/// How often statuses that could not be written are tried again.
const STATUS_RETRY: Duration = Duration::from_secs(10);

/// The Lease replicas compete for.
pub const LEASE: &str = "mycel-cp-leader";
/// How often a CA Secret that is not there yet is looked for, and the trust bundle checked.
const CA_RETRY: Duration = Duration::from_secs(2);
const BUNDLE_CHECK: Duration = Duration::from_secs(60);

/// Where this replica runs and whom it trusts.
pub struct Options {
    /// The control plane's namespace: its CA Secret, trust bundle and Lease live there.
    pub namespace: String,
    /// This replica's name in the election.
    pub identity: String,
    /// The node daemon's service account (namespace, name).
    pub node_service_account: (String, String),
    pub retry: Retry,
    pub timing: leader::Timing,
}

/// A control plane replica in a cluster once it can serve: the first config listed, the
/// election running; with the CA it loaded and how it authenticates nodes.
pub struct Cluster {
    pub source: Source,
    /// The objects first listed, and their model (whose config the caller publishes).
    pub objects: translate::Objects,
    pub first: Translated,
    pub leader: channel::Receiver<bool>,
}

impl Cluster {
    pub async fn start(
        client: Client,
        options: &Options,
    ) -> Result<(Self, Ca, NodeAuth), ca_secret::CaSecretError> {
        let (leader_tx, leader) = channel::channel(false);
        tokio::spawn(leader::run(
            client.clone(),
            options.namespace.clone(),
            LEASE.to_owned(),
            options.identity.clone(),
            options.timing,
            leader_tx,
        ));
        let source = Source::start(client.clone(), options.retry).await;
        let (objects, first) = source.snapshot(&mesh_model::MeshConfig::default());
        let ca = ca_secret::load(&client, &options.namespace, leader.clone(), CA_RETRY).await?;
        tokio::spawn(ca_secret::keep_bundle(
            client.clone(),
            options.namespace.clone(),
            ca.root_pem(),
            leader.clone(),
            BUNDLE_CHECK,
        ));
        let (sa_ns, sa_name) = &options.node_service_account;
        let auth = NodeAuth::kubernetes(Arc::new(TokenReviewer::new(
            client,
            (sa_ns, sa_name),
            source.pods(),
        )));
        let cluster = Self {
            source,
            objects,
            first,
            leader,
        };
        Ok((cluster, ca, auth))
    }
}

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

    /// Every pod as last seen: node authentication finds a token's pod here.
    pub fn pods(&self) -> kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod> {
        self.stores.pods()
    }

    /// What the stores hold now, and its model (`previous`: the mesh settings in force).
    pub fn snapshot(&self, previous: &mesh_model::MeshConfig) -> (translate::Objects, Translated) {
        let objects = self.stores.objects();
        let translated = translate::translate(&objects, previous);
        (objects, translated)
    }
}

/// Publishes a new version whenever the watched objects change what the mesh is, and, while
/// this replica leads, keeps the statuses of the AccessPolicies, TrafficPolicies and
/// ServiceRoutes in step.
pub async fn follow(cluster: Cluster, publish: channel::Sender<Published>, shared: Arc<Shared>) {
    let Cluster {
        source,
        mut objects,
        first,
        leader,
    } = cluster;
    let statuses = status::Writer::new(source.client.clone());
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
        // The statuses of the objects the verdicts are about, not of a later list.
        if *leader.borrow() {
            for (kind, objects, outcomes) in [
                (
                    &status::ACCESS_POLICY,
                    &objects.policies,
                    &translated.policies,
                ),
                (
                    &status::TRAFFIC_POLICY,
                    &objects.traffic_policies,
                    &translated.traffic_policies,
                ),
                (&status::SERVICE_ROUTE, &objects.routes, &translated.routes),
            ] {
                statuses.write(kind, objects, outcomes).await;
            }
        }
        tokio::select! {
            () = source.changed.notified() => tokio::time::sleep(SETTLE).await,
            () = tokio::time::sleep(STATUS_RETRY) => {}
        }
        let previous = publish.borrow().config.mesh.clone();
        (objects, translated) = source.snapshot(&previous);
        // Only its problems and verdicts are read after this.
        publish_if_changed(&publish, std::mem::take(&mut translated.config));
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
mod tests;
