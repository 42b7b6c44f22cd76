//! State shared by the gRPC service, the config source and the status endpoint.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use mesh_model::{authz::PolicyIndex, Config};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    ca::Ca,
    metrics::{CpMetrics, Figures},
    node_auth::NodeAuth,
};

/// One accepted configuration. Versions start at 1 with each control-plane process; nodes
/// take a snapshot at the start of every stream, so versions need not survive a restart.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: u64,
    pub config: Arc<Config>,
    /// The config's policies, indexed once per version: every node's fast-deny set is
    /// computed from it.
    pub policies: Arc<PolicyIndex>,
}

impl Published {
    pub fn new(version: u64, config: Config) -> Self {
        let policies = PolicyIndex::new(config.mesh.default_action, config.selections());
        Self {
            version,
            config: Arc::new(config),
            policies: Arc::new(policies),
        }
    }
}

/// Publishes `config` as the next version if it differs from the one in force. Returns the
/// version in force and whether it is new.
pub fn publish_if_changed(publish: &watch::Sender<Published>, config: Config) -> (u64, bool) {
    let current = publish.borrow().version;
    if config == *publish.borrow().config {
        return (current, false);
    }
    let version = current + 1;
    tracing::info!(
        version,
        workloads = config.workloads.len(),
        services = config.services.len(),
        policies = config.policies.len(),
        "config applied"
    );
    publish.send_replace(Published::new(version, config));
    (version, true)
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    /// The version in force.
    pub version: u64,
    /// Why the files on disk are not in force, if they are not.
    pub error: Option<String>,
    pub error_file: Option<PathBuf>,
    #[serde(serialize_with = "unix_seconds")]
    pub checked_at: SystemTime,
}

impl ConfigStatus {
    pub fn ok(version: u64) -> Self {
        Self {
            version,
            error: None,
            error_file: None,
            checked_at: SystemTime::now(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    /// Config streams open right now.
    pub streams: u32,
    pub acked_version: Option<u64>,
    /// The last version the node rejected, and why.
    pub last_nack: Option<(u64, String)>,
    pub certificates_issued: u64,
    pub certificates_refused: u64,
}

pub struct Shared {
    pub config: watch::Receiver<Published>,
    /// How calling nodes are authenticated: join tokens, or TokenReview in Kubernetes.
    pub auth: NodeAuth,
    pub ca: Ca,
    pub metrics: CpMetrics,
    /// Set once the gRPC server serves (its certificate issued): the readiness probe.
    pub serving: std::sync::atomic::AtomicBool,
    config_status: Mutex<ConfigStatus>,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
}

impl Shared {
    pub fn new(
        config: watch::Receiver<Published>,
        auth: NodeAuth,
        ca: Ca,
        metrics: CpMetrics,
    ) -> Self {
        let version = config.borrow().version;
        Self {
            config,
            auth,
            ca,
            metrics,
            serving: std::sync::atomic::AtomicBool::new(false),
            config_status: Mutex::new(ConfigStatus::ok(version)),
            nodes: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set_config_status(&self, status: ConfigStatus) {
        *self.config_status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    pub fn config_status(&self) -> ConfigStatus {
        self.config_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn update_node(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        f(nodes.entry(node.to_owned()).or_default());
    }

    pub fn nodes(&self) -> BTreeMap<String, NodeStatus> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets the metrics read this state when scraped. Weakly: the state owns the metrics, not
    /// the other way round.
    pub fn watch_metrics(self: &Arc<Self>) -> Result<(), prometheus::Error> {
        let state = Arc::downgrade(self);
        self.metrics
            .watch(move || state.upgrade().map(|s| s.figures()))
    }

    fn figures(&self) -> Figures {
        let status = self.config_status();
        Figures {
            nodes_connected: self.nodes().values().filter(|n| n.streams > 0).count(),
            config_version: status.version,
            config_in_force: status.error.is_none(),
            ca_expiry: x509_parser::parse_x509_certificate(self.ca.root_der())
                .map(|(_, c)| c.validity().not_after.timestamp() as f64)
                .unwrap_or(0.0),
        }
    }
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}
