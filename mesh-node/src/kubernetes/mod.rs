//! mesh-node in a Kubernetes cluster (`run --kubernetes`): which pods of this node to capture
//! and where their network namespaces are. The control plane still supplies identities,
//! services and policy, exactly as in universal mode; only the set of pods to enroll is
//! decided here, because a pod must be captured when its network comes up, before the
//! control plane can know its address.
//!
//! - `members.rs`: the rule (shared with mesh-cp through `mesh_model::membership`).
//! - `procfs.rs`: the netns of pods that were running before the daemon (found by the pod
//!   uid in their processes' cgroups).
//! - Here: the watches of this node's pods and of namespaces, the netns each pod reported
//!   through the CNI plugin, and the answers to the plugin (`crate::cni::server`).

mod members;
mod procfs;

pub use metrics::PodMetrics;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{
        reflector::{store::Writer, ObjectRef, Store},
        watcher,
    },
    Api, Client,
};
use mesh_kube::{ApiHealth, Reflectors, Retry};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::{
    cni::protocol::{PodRef, Reply},
    workloads::{Workload, WorkloadId},
};

/// How long an ADD waits for the pod to show up in this node's watch.
const POD_WAIT: Duration = Duration::from_secs(10);

/// A request to the enroll loop: make the captured set equal to [`Pods::desired`] now, and
/// say whether `pod` is captured afterwards.
pub struct EnrollRequest {
    pub pod: WorkloadId,
    pub done: oneshot::Sender<Result<bool, String>>,
}

/// Where a pod's netns came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// The CNI plugin's ADD for this sandbox container.
    Cni { container_id: String },
    /// A process of the pod, found in /proc.
    Scan,
}

/// This node's pods as the daemon knows them. Shared by the enroll loop (which reads
/// [`Pods::desired`]) and the CNI socket (which reports netns and waits for enrollment).
pub struct Pods {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    /// Both stores have been listed once: until then a missing pod proves nothing.
    listed: AtomicBool,
    /// Bumped on every change of the stores or of the netns table.
    generation: watch::Sender<u64>,
    /// Pod uid → its netns and where that came from.
    netns: Mutex<HashMap<String, (PathBuf, Origin)>>,
    /// Pods refused an identity whose refusal was logged, by uid.
    told: Mutex<HashSet<String>>,
    host_proc: PathBuf,
    enroll: mpsc::Sender<EnrollRequest>,
    pub health: Arc<ApiHealth>,
    metrics: PodMetrics,
}

/// What the enroll loop holds: the shared pods, the requests of the CNI socket, and the
/// generation to wake up on.
pub struct Local {
    pub pods: Arc<Pods>,
    pub requests: mpsc::Receiver<EnrollRequest>,
    pub changed: watch::Receiver<u64>,
}

impl Pods {
    /// Starts watching the pods of `node` and every namespace.
    pub fn start(
        client: Client,
        node: &str,
        host_proc: PathBuf,
        retry: Retry,
        metrics: PodMetrics,
    ) -> Local {
        let reflectors = Reflectors {
            retry,
            changed: Arc::new(Notify::new()),
            health: Arc::new(ApiHealth::default()),
        };
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pods = reflectors.spawn(
            "Pod",
            Api::all(client.clone()),
            on_node,
            Writer::default(),
            mesh_kube::reflect::strip_pod,
        );
        let namespaces = reflectors.spawn(
            "Namespace",
            Api::all(client),
            watcher::Config::default(),
            Writer::default(),
            |_| {},
        );
        let (enroll, requests) = mpsc::channel(16);
        let (generation, changed) = watch::channel(0);
        let shared = Arc::new(Pods {
            pods,
            namespaces,
            listed: AtomicBool::new(false),
            generation,
            netns: Mutex::new(HashMap::new()),
            told: Mutex::default(),
            host_proc,
            enroll,
            health: reflectors.health.clone(),
            metrics,
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            if let Some(p) = weak.upgrade() {
                let (pods, namespaces) = (p.pods.clone(), p.namespaces.clone());
                drop(p);
                let _ = pods.wait_until_ready().await;
                let _ = namespaces.wait_until_ready().await;
            }
            loop {
                let Some(p) = weak.upgrade() else { return };
                if !p.listed.swap(true, Ordering::AcqRel) {
                    tracing::info!(pods = p.pods.len(), "this node's pods listed");
                }
                p.bump();
                drop(p);
                reflectors.changed.notified().await;
            }
        });
        Local {
            pods: shared,
            requests,
            changed,
        }
    }

    /// Whether this node's pods were listed once, so [`Pods::desired`] is complete.
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PathBuf, Origin)>> {
        self.netns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pods to capture now: members with a known netns. Members without one are looked
    /// for in /proc; entries of pods gone from the API are dropped.
    pub fn desired(&self) -> BTreeMap<WorkloadId, Workload> {
        let pods = self.pods.state();
        let namespaces = self.namespaces.state();
        let (members, refused) = members::members(pods.iter().map(|p| &**p), &namespaces);
        self.tell_refused(refused);
        let mut table = self.table();
        if self.listed.load(Ordering::Acquire) {
            let live: HashSet<&str> = pods
                .iter()
                .filter_map(|p| p.metadata.uid.as_deref())
                .collect();
            table.retain(|uid, _| live.contains(uid.as_str()));
        }
        let missing: HashSet<String> = members
            .iter()
            .filter(|m| !table.contains_key(&m.uid))
            .map(|m| m.uid.clone())
            .collect();
        if !missing.is_empty() {
            for (uid, path) in procfs::find_netns(&self.host_proc, &missing) {
                tracing::info!(uid, netns = %path.display(), "found the netns of a running pod in /proc");
                self.metrics.found_in_proc.inc();
                table.insert(uid, (path, Origin::Scan));
            }
        }
        members
            .into_iter()
            .filter_map(|m| {
                let (netns, _) = table.get(&m.uid)?;
                let workload = Workload {
                    id: m.id.clone(),
                    netns: netns.clone(),
                };
                Some((m.id, workload))
            })
            .collect()
    }

    async fn try_add(&self, pod: &PodRef, container_id: &str, netns: &Path) -> Reply {
        let mut changed = self.generation.subscribe();
        let decided = tokio::time::timeout(POD_WAIT, async {
            loop {
                if let Some(d) = self.decide(pod) {
                    return d;
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        let member = match decided {
            Ok(Some(m)) => m,
            Ok(None) => return Reply::NotInMesh,
            Err(_) => {
                let why = match self.health.last_error() {
                    Some(e) => format!("the Kubernetes API is failing: {e}"),
                    None => "not in this node's watch yet".to_owned(),
                };
                return Reply::Error {
                    message: format!(
                        "pod {}/{} (uid {}) not seen within {}s: {why}",
                        pod.namespace,
                        pod.name,
                        pod.uid,
                        POD_WAIT.as_secs()
                    ),
                };
            }
        };
        let netns = self.host_path(netns);
        self.table().insert(
            member.uid.clone(),
            (
                netns.clone(),
                Origin::Cni {
                    container_id: container_id.to_owned(),
                },
            ),
        );
        self.bump();
        let (done, answer) = oneshot::channel();
        let request = EnrollRequest {
            pod: member.id.clone(),
            done,
        };
        if self.enroll.send(request).await.is_err() {
            return Reply::Error {
                message: "the node daemon is shutting down".into(),
            };
        }
        match answer.await {
            Ok(Ok(true)) => {
                tracing::info!(workload = %member.id, netns = %netns.display(), "pod captured before its containers start");
                Reply::Enrolled {
                    workload: member.id.to_string(),
                }
            }
            Ok(Ok(false)) => Reply::Error {
                message: format!("{} left this node's pods before it was enrolled", member.id),
            },
            Ok(Err(message)) => Reply::Error { message },
            Err(_) => Reply::Error {
                message: "the node daemon is shutting down".into(),
            },
        }
    }

    /// Logs, once per pod, why a pod that asked for the mesh is not captured.
    fn tell_refused(&self, refused: Vec<(WorkloadId, String, &'static str)>) {
        let mut told = self.told.lock().unwrap_or_else(|p| p.into_inner());
        let now: HashSet<String> = refused.iter().map(|(_, uid, _)| uid.clone()).collect();
        for (pod, uid, reason) in refused {
            if !told.contains(&uid) {
                tracing::warn!(%pod, %uid, "pod not captured and given no identity: {reason}");
            }
        }
        *told = now;
    }

    /// `Some(member or not)` once the pod (this incarnation of it) is in the watch.
    fn decide(&self, pod: &PodRef) -> Option<Option<members::Member>> {
        if !self.listed.load(Ordering::Acquire) {
            return None;
        }
        let found = self
            .pods
            .get(&ObjectRef::new(&pod.name).within(&pod.namespace))?;
        if !pod.uid.is_empty() && found.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            return None;
        }
        let namespace = self.namespaces.get(&ObjectRef::new(&pod.namespace));
        // The namespace's watch may lag behind the pod's: without a label of its own, the
        // pod waits for its namespace rather than be judged without it.
        if namespace.is_none() && members::mesh_label(&found.metadata).is_none() {
            return None;
        }
        Some(members::member(&found, namespace.as_deref()))
    }

    /// A netns path as the runtime on the host named it, as this daemon can open it: the
    /// host's /proc is mounted at `host_proc`, and `/var/run` may not lead to `/run` here.
    fn host_path(&self, netns: &Path) -> PathBuf {
        if let Ok(rest) = netns.strip_prefix("/proc") {
            return self.host_proc.join(rest);
        }
        if let Ok(rest) = netns.strip_prefix("/var/run") {
            let direct = Path::new("/run").join(rest);
            if !netns.exists() && direct.exists() {
                return direct;
            }
        }
        netns.to_path_buf()
    }
}

impl crate::cni::server::Pods for Pods {
    /// The CNI plugin's ADD: once the pod is in this node's watch, record its netns and, if
    /// it is in the mesh, have it enrolled before answering.
    async fn add(&self, pod: &PodRef, container_id: &str, netns: &Path) -> Reply {
        let reply = self.try_add(pod, container_id, netns).await;
        self.metrics.count("add", &reply);
        reply
    }

    /// The CNI plugin's DEL: forget the netns that sandbox reported. The pod leaves the
    /// captured set on the enroll loop's next round.
    fn del(&self, pod: &PodRef, container_id: &str) -> Reply {
        let removed = {
            let mut table = self.table();
            let ours = table.get(&pod.uid).is_some_and(|(_, origin)| match origin {
                Origin::Cni { container_id: c } => c == container_id,
                Origin::Scan => true,
            });
            ours && table.remove(&pod.uid).is_some()
        };
        if removed {
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "pod sandbox removed");
            self.bump();
        }
        self.metrics.count("del", &Reply::Removed);
        Reply::Removed
    }
}

mod metrics {
    use prometheus::{IntCounter, IntCounterVec, Opts};

    use crate::cni::protocol::Reply;

    /// What the CNI socket answered, and the pods found in /proc; registered with the node's
    /// other metrics.
    #[derive(Clone)]
    pub struct PodMetrics {
        requests: IntCounterVec,
        pub found_in_proc: IntCounter,
    }

    impl PodMetrics {
        pub fn new() -> Result<Self, prometheus::Error> {
            Ok(Self {
                requests: IntCounterVec::new(
                    Opts::new(
                        "mycel_cni_requests_total",
                        "Requests of the CNI plugin by command and answer: enrolled, not_in_mesh, refused (the pod's sandbox fails and is retried), removed",
                    ),
                    &["command", "outcome"],
                )?,
                found_in_proc: IntCounter::new(
                    "mycel_pods_found_in_proc_total",
                    "Pods whose network namespace was found through their processes in /proc (running before the daemon, or in a namespace the CNI plugin skips)",
                )?,
            })
        }

        pub fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 2] {
            [
                Box::new(self.requests.clone()),
                Box::new(self.found_in_proc.clone()),
            ]
        }

        pub fn count(&self, command: &str, reply: &Reply) {
            let outcome = match reply {
                Reply::Enrolled { .. } => "enrolled",
                Reply::NotInMesh => "not_in_mesh",
                Reply::Removed => "removed",
                Reply::Error { .. } => "refused",
            };
            self.requests.with_label_values(&[command, outcome]).inc();
        }
    }
}

#[cfg(test)]
mod tests;
