//! The node reconciler: the one owner of what this node has applied, and the one order in
//! which a version is applied, whichever source it comes from (the control plane's stream in
//! `control_plane.rs`, or offline the workloads file in `file.rs`):
//!
//! 1. inbound mode: the mTLS mode and the open plaintext ports in the kernel
//!    (`proxy/kernel_policy.rs`);
//! 2. directory: routes, peers, TLS and the policy index rebuilt from the view, then the open
//!    connections re-checked against it (`proxy/directory.rs`, `proxy/authz.rs`);
//! 3. pods: the captured set made equal to what the version places here (`enroll.rs`), so a
//!    new pod is captured under the version's mode and directory, never an older one's;
//! 4. fast deny: the enrolled pods' entries in the kernel (`proxy/kernel_policy.rs`), keyed
//!    by the cookies enrollment gives them;
//! 5. the outcome, which the stream sends to mesh-cp as its acknowledgement.
//!
//! So once mesh-cp sees a version acknowledged, every part of the node enforces it.

mod control_plane;
mod file;

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use tokio::sync::watch;

pub use control_plane::follow as follow_control_plane;
pub use file::follow as follow_file;

use crate::{
    admin,
    control::MeshView,
    enroll::{EnrollError, Enroller},
    handoff::gate::Gate,
    identity::SvidStore,
    kubernetes,
    proxy::{authz::Authz, directory::Directory, kernel_policy::KernelPolicy, Shared},
    tunnel::{anchors::Anchors, tls},
    workloads::{Workload, WorkloadId},
};

/// The workloads to capture, by id.
pub type Desired = BTreeMap<WorkloadId, Workload>;

/// What the reconciler publishes: the readers (proxy, identity manager, admin, metrics) hold
/// the receiving ends.
pub struct Outputs {
    /// The control plane's config as applied (empty offline).
    pub view: watch::Sender<Arc<MeshView>>,
    /// The routing view the proxy decides with (empty offline: every destination is passed
    /// through unchanged).
    pub directory: watch::Sender<Arc<Directory>>,
    pub status: watch::Sender<admin::Status>,
}

pub struct Node {
    name: String,
    enroller: Enroller,
    kernel: KernelPolicy,
    authz: Arc<Authz>,
    anchors: Arc<Anchors>,
    svids: Arc<SvidStore>,
    out: Outputs,
    /// In Kubernetes this node's pods decide what is captured; the control plane only names
    /// them (with no netns).
    pods: Option<Arc<kubernetes::Pods>>,
    /// A set that failed to enroll, retried on the next tick.
    pending: Option<Desired>,
    /// Whether the pods an earlier daemon left enrolled in the kernel were checked against
    /// this daemon's first complete set.
    pruned: bool,
    capture: Arc<crate::capture::Capture>,
    /// Where this daemon is in handing over to a new one.
    gate: Gate,
}

impl Node {
    pub fn new(
        name: &str,
        enroller: Enroller,
        shared: &Shared,
        svids: Arc<SvidStore>,
        out: Outputs,
    ) -> Self {
        Self {
            name: name.to_owned(),
            enroller,
            kernel: KernelPolicy::new(shared.capture.clone()),
            authz: shared.authz.clone(),
            anchors: shared.anchors.clone(),
            svids,
            out,
            pods: None,
            pending: None,
            pruned: false,
            capture: shared.capture.clone(),
            gate: Gate::default(),
        }
    }

    pub fn enrolled(&self) -> usize {
        self.enroller.enrolled()
    }

    /// The handoff gate the follow loops pause on.
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = gate;
    }

    /// Taken over: stops accepting, closes the QUIC connections (the new daemon reads the
    /// QUIC sockets next); how many QUIC connections were open.
    pub async fn hand_over(&mut self) -> u64 {
        self.enroller.stop_accepting();
        self.enroller.close_quic_for_handoff().await
    }

    /// Applies one version of the control plane's config in the order above; the error (the
    /// set could not be enrolled; the previous one stays and is retried) is what the
    /// acknowledgement carries.
    pub async fn apply_version(&mut self, view: Arc<MeshView>) -> Result<(), String> {
        // Mode and directory before the pods: a pod this version brings is policed from its
        // first packet under the version's mode, and its first connects are routed by the
        // version's directory, not by the previous one. In Kubernetes the node's own watch can
        // bring pods before the first version (`pods_changed`): they are policed under the
        // mode the pinned map keeps from the previous daemon (none on a node's first start)
        // and wait for the directory before connecting to a mesh destination (outbound.rs).
        let settings = &view.mesh_policy;
        self.kernel
            .set_inbound(settings.mtls, &settings.plaintext_ports);
        self.kernel.set_local_hop(settings.local_hop);
        self.publish(view.clone());
        let desired = self.wanted(view.local_workloads(&self.name));
        let outcome = self.enroll(desired).await;
        self.sync_fast_deny();
        self.out.status.send_modify(|s| {
            s.config_version = view.version;
            s.config_updated_at = Some(SystemTime::now());
        });
        match &outcome {
            Ok(()) => tracing::info!(enrolled = self.enrolled(), "workloads applied"),
            Err(e) => tracing::error!(
                "cannot enroll the workloads, keeping the previous set and retrying: {e}"
            ),
        }
        outcome
    }

    /// Offline mode: captures exactly the file's workloads, or changes nothing; its
    /// `localHop` applies to new connections either way.
    pub async fn apply_workloads(
        &mut self,
        file: crate::workloads::FileConfig,
    ) -> Result<(), EnrollError> {
        self.kernel.set_local_hop(file.local_hop);
        let outcome = self.enroller.apply(file.workloads).await;
        self.record(outcome.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        if outcome.is_ok() {
            self.prune_once();
            self.out
                .status
                .send_modify(|s| s.config_updated_at = Some(SystemTime::now()));
        }
        outcome
    }

    /// Records a config the source could not read or parse, which changes nothing.
    pub fn rejected(&self) {
        self.out.status.send_modify(|s| s.config_errors += 1);
    }

    /// Kubernetes: the pods of this node decide what is captured from now on.
    pub fn follow_pods(&mut self, pods: Arc<kubernetes::Pods>) {
        self.pods = Some(pods);
    }

    /// Kubernetes: this node's pods (or their netns) changed.
    pub async fn pods_changed(&mut self) {
        let Some(pods) = &self.pods else { return };
        let desired = pods.desired();
        if self.enroller.is_current(&desired) {
            // Nothing to change, but the set may have become complete (the pods listed).
            let complete = self.pending.is_none() && pods.listed();
            self.out.status.send_modify(|s| s.set_complete = complete);
            return;
        }
        match self.enroll(desired).await {
            Ok(()) => tracing::info!(enrolled = self.enrolled(), "this node's pods applied"),
            Err(e) => tracing::error!("cannot enroll this node's pods, retrying: {e}"),
        }
        self.sync_fast_deny();
    }

    /// Kubernetes: the CNI plugin asks whether `pod` is captured, once the current set is.
    pub async fn enroll_pod(&mut self, pod: &WorkloadId) -> Result<bool, String> {
        let Some(pods) = &self.pods else {
            return Ok(false);
        };
        let outcome = self.enroll(pods.desired()).await;
        self.sync_fast_deny();
        outcome.map(|()| self.enroller.is_enrolled(pod))
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Tries again the set that failed to enroll (in Kubernetes, what is wanted now).
    pub async fn retry(&mut self) {
        let Some(desired) = self.pending.take() else {
            return;
        };
        let desired = self.wanted(desired);
        if self.enroll(desired).await.is_ok() {
            self.sync_fast_deny();
            tracing::info!(enrolled = self.enrolled(), "workloads applied on retry");
        }
    }

    pub fn set_connected(&self, up: bool) {
        self.out.status.send_modify(|s| s.cp_connected = up);
    }

    /// Closes the listeners, then waits up to `drain` for open connections; the kernel keeps
    /// capturing the pods (fail closed) until the next daemon takes over.
    pub async fn shutdown(&mut self, drain: std::time::Duration) {
        self.enroller.shutdown(drain).await;
    }

    /// A receiver of the applied view, for the tasks that follow it.
    pub fn view(&self) -> watch::Receiver<Arc<MeshView>> {
        self.out.view.subscribe()
    }

    pub fn svids(&self) -> Arc<SvidStore> {
        self.svids.clone()
    }

    fn wanted(&self, from_cp: Desired) -> Desired {
        match &self.pods {
            Some(p) => p.desired(),
            None => from_cp,
        }
    }

    /// Applies `desired`; on failure keeps it for the retry tick.
    async fn enroll(&mut self, desired: Desired) -> Result<(), String> {
        let outcome = self
            .enroller
            .apply(desired.clone())
            .await
            .map_err(|e| e.to_string());
        self.pending = outcome.is_err().then_some(desired);
        self.record(outcome.clone());
        if outcome.is_ok() {
            self.prune_once();
        }
        outcome
    }

    /// After the first complete set is applied: pods an earlier daemon enrolled that the set
    /// lacks left the mesh (or their netns went) while no daemon ran, and are let go. Not in
    /// Kubernetes, where the set is never known to be complete (a running pod whose netns the
    /// /proc scan misses, a namespace not listed yet): there a pod's pins go with its netns
    /// (`Capture::attach`), and a pod that left the mesh while no daemon ran stays captured,
    /// its connects refused, until it is restarted.
    fn prune_once(&mut self) {
        if self.pruned || self.pods.is_some() {
            return;
        }
        self.pruned = true;
        let keep = self.enroller.pods().map(|(_, cookie)| cookie).collect();
        let removed = self.capture.keep_only_enrolled(&keep);
        if removed > 0 {
            tracing::info!(
                removed,
                "unenrolled pods an earlier daemon left captured that are no longer in the mesh"
            );
        }
    }

    fn record(&self, outcome: Result<(), String>) {
        let enrolled = self.enrolled();
        let without_client_address = self.enroller.without_client_address();
        // In Kubernetes the set is complete once this node's pods were listed.
        let complete = outcome.is_ok() && self.pods.as_ref().is_none_or(|p| p.listed());
        self.out.status.send_modify(|s| {
            s.enrolled = enrolled;
            s.without_client_address = without_client_address;
            s.set_complete = complete;
            match outcome {
                Ok(()) => s.config_applied += 1,
                Err(_) => s.config_errors += 1,
            }
        });
    }

    /// Makes `view` the one in force: tunnels to roots that left the bundle are told first
    /// (`tunnel/anchors.rs`), then the directory is rebuilt and open connections that its
    /// policies now deny are closed.
    fn publish(&self, view: Arc<MeshView>) {
        let roots = view.trust_roots.iter().map(|r| tls::anchor_id(r));
        self.anchors.keep_only(roots.collect());
        let directory = Arc::new(Directory::new(&view, self.svids.clone()));
        self.out.directory.send_replace(directory.clone());
        self.authz.recheck(&directory);
        self.out.view.send_replace(view);
    }

    /// The kernel's fast-deny entries made those of the enrolled pods in the view in force.
    fn sync_fast_deny(&self) {
        let view = self.out.view.borrow().clone();
        self.kernel
            .sync_fast_deny(self.enroller.pods(), &view.fast_deny);
    }
}
