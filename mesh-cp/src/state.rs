//! State shared by the gRPC service, the config source and the status endpoint.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use mesh_model::Config;
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    ca::Ca,
    distribute::{Catalog, ChangeLog, Distribution, FastDeny},
    metrics::{CpMetrics, Figures},
    node_auth::NodeAuth,
};

/// One accepted configuration. Each control-plane run starts above every version an earlier
/// run published (`first_version`), so versions never go back; `epoch` still tells runs
/// apart, so a node never resumes from another's version.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: u64,
    pub config: Arc<Config>,
    /// What nodes are sent of it, built once for all of them.
    pub distribution: Distribution,
}

impl Published {
    /// The first version.
    pub fn new(version: u64, config: Config) -> Self {
        Self::build(
            version,
            config,
            (0, &Config::default()),
            &Distribution::default(),
        )
    }

    /// `config` as the version after this one.
    pub fn next(&self, config: Config) -> Self {
        self.at(self.version + 1, config)
    }

    /// `config` as `version`, a later one than this (in etcd mode, the store's revision of
    /// the change).
    pub fn at(&self, version: u64, config: Config) -> Self {
        Self::build(
            version,
            config,
            (self.version, &self.config),
            &self.distribution,
        )
    }

    fn build(
        version: u64,
        config: Config,
        (previous_version, previous_config): (u64, &Config),
        previous: &Distribution,
    ) -> Self {
        let started = std::time::Instant::now();
        let (catalog, mut change) =
            Catalog::build(&config, &previous.catalog, previous_config, version);
        change.previous = previous_version;
        // Said once when it starts (the first version included), not on every change.
        if catalog.fast_deny == FastDeny::OverBudget
            && previous.catalog.fast_deny == FastDeny::Computed
        {
            tracing::warn!(
                version,
                budget = crate::distribute::catalog::FAST_DENY_BUDGET,
                "fast-deny sets not computed: too many sources times destinations that can \
                 deny; destinations' nodes still refuse what policy denies"
            );
        }
        tracing::debug!(
            version,
            changed = change.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "config catalog built"
        );
        // The first version's change is everything: nothing resumes from before it.
        let log = if previous_version == 0 {
            ChangeLog::default()
        } else {
            previous.log.with(change)
        };
        Self {
            version,
            config: Arc::new(config),
            distribution: Distribution {
                catalog: Arc::new(catalog),
                log,
            },
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
    tracing::info!(
        version = current + 1,
        workloads = config.workloads.len(),
        services = config.services.len(),
        policies = config.policies.len(),
        "config applied"
    );
    // Built outside the channel's lock: streams keep reading the version in force meanwhile.
    let current = publish.borrow().clone();
    let next = current.next(config);
    let version = next.version;
    publish.send_replace(next);
    (version, true)
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    /// The version in force.
    pub version: u64,
    /// Why the files on disk are not in force, if they are not.
    pub error: Option<String>,
    pub error_file: Option<PathBuf>,
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339")]
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
    /// Other nodes' workloads and addresses its on-demand streams watch.
    pub watches: usize,
    /// When it last acknowledged a version.
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339_opt")]
    pub acked_at: Option<SystemTime>,
    /// The version it holds everything of: the last it acknowledged with nothing sent after,
    /// or a later one that had nothing for it. A node is current when this is the version in
    /// force; `acked_version` alone lags behind versions that changed nothing of its part.
    pub synced_version: Option<u64>,
    /// Since when the oldest version sent to it has waited for its answer; none when it has
    /// answered everything.
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339_opt")]
    pub unanswered_since: Option<SystemTime>,
    /// When its streams last went from none to one, or from some to none.
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339_opt")]
    pub connected_at: Option<SystemTime>,
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339_opt")]
    pub disconnected_at: Option<SystemTime>,
    /// Its metrics endpoint: the port it named, at the address its last stream came from.
    pub metrics: Option<std::net::SocketAddr>,
    /// When the last certificate issued to each identity placed on it expires. Kept to the
    /// identities placed on it at each issue, so at most one per workload it holds.
    #[serde(skip)]
    pub certificates: BTreeMap<mesh_model::SpiffeId, SystemTime>,
}

impl NodeStatus {
    /// One more config stream open.
    pub fn opened(&mut self) {
        if self.streams == 0 {
            self.connected_at = Some(SystemTime::now());
            self.disconnected_at = None;
        }
        self.streams += 1;
    }

    /// One config stream fewer.
    pub fn closed(&mut self) {
        self.streams = self.streams.saturating_sub(1);
        if self.streams == 0 {
            self.disconnected_at = Some(SystemTime::now());
            // Nothing waits for an answer on a stream that is gone.
            self.unanswered_since = None;
        }
    }
}

/// Snapshots sent at once, at most (see `grpc::send_snapshot`). Each holds about one part
/// (32 KiB) of memory and a core's worth of encoding while it lasts.
pub const FIRST_SYNCS: usize = 32;

pub struct Shared {
    pub config: watch::Receiver<Published>,
    /// This run's epoch: random, so that a node resumes only from versions this process
    /// published.
    pub epoch: u64,
    /// Places for snapshots being sent ([`FIRST_SYNCS`]).
    pub first_syncs: tokio::sync::Semaphore,
    /// How calling nodes are authenticated: join tokens, or TokenReview in Kubernetes.
    pub auth: NodeAuth,
    pub ca: Ca,
    pub metrics: CpMetrics,
    /// Set once the gRPC server serves (its certificate issued): the readiness probe.
    pub serving: std::sync::atomic::AtomicBool,
    /// Set when the process stops in order: each config stream ends with
    /// `mesh_api::shutdown::status()`, then the server closes its connections.
    pub stopping: watch::Sender<bool>,
    /// When this process started: certificates issued before it are not known to it.
    pub started_at: SystemTime,
    /// Where the config comes from: `directory` (a bad file keeps the whole change out) or
    /// `kubernetes` (a bad object is left out alone).
    pub config_source: &'static str,
    config_status: Mutex<ConfigStatus>,
    /// The config store (etcd), when the config comes from one.
    store: Mutex<Option<StoreStatus>>,
    /// Whether this replica leads the others, where replicas elect one (etcd, Kubernetes).
    pub leader: Option<watch::Receiver<bool>>,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
}

/// Whether the config store answers, as the last try found.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    pub endpoints: String,
    pub reachable: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// The store's revision this replica has read up to.
    pub revision: i64,
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339")]
    pub checked_at: SystemTime,
    /// Since when it has been reachable, or not.
    #[serde(serialize_with = "mesh_daemon::time::serialize_rfc3339")]
    pub since: SystemTime,
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
            epoch: random_epoch(),
            first_syncs: tokio::sync::Semaphore::new(FIRST_SYNCS),
            auth,
            ca,
            metrics,
            serving: std::sync::atomic::AtomicBool::new(false),
            stopping: watch::channel(false).0,
            started_at: SystemTime::now(),
            config_source: "directory",
            config_status: Mutex::new(ConfigStatus::ok(version)),
            store: Mutex::new(None),
            leader: None,
            nodes: Mutex::new(BTreeMap::new()),
        }
    }

    /// This state, for a config that comes from `source` (see [`Shared::config_source`]).
    pub fn with_config_source(mut self, source: &'static str) -> Self {
        self.config_source = source;
        self
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

    /// Records what the last try of the store found; `since` moves only when that changes.
    pub fn set_store(&self, mut status: StoreStatus) {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = store.as_ref().filter(|s| s.reachable == status.reachable) {
            status.since = last.since;
        }
        *store = Some(status);
    }

    /// Whether this replica leads now; `None` where there is no election.
    pub fn leads(&self) -> Option<bool> {
        self.leader.as_ref().map(|l| *l.borrow())
    }

    pub fn store(&self) -> Option<StoreStatus> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update_node(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        f(nodes.entry(node.to_owned()).or_default());
    }

    pub fn nodes(&self) -> BTreeMap<String, NodeStatus> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `f` of the nodes' status, under the lock: a view without copying every node's
    /// certificates (streams wait on this lock; keep `f` short).
    pub fn with_nodes<T>(&self, f: impl FnOnce(&BTreeMap<String, NodeStatus>) -> T) -> T {
        f(&self.nodes.lock().unwrap_or_else(|p| p.into_inner()))
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
            nodes_connected: self.with_nodes(|n| n.values().filter(|n| n.streams > 0).count()),
            config_version: status.version,
            config_in_force: status.error.is_none(),
            store_reachable: self.store().map(|s| s.reachable),
            leader: self.leads(),
            ca_expiry: self
                .ca
                .root_not_after()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs() as f64),
        }
    }
}

pub(crate) fn random_epoch() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 8];
    // Without the system's randomness the clock still tells runs apart.
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}
