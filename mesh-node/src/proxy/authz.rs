//! Authorization at the destination. Every delivery to a local pod (through a tunnel or from a
//! pod of this node) is checked against the policies that select it; each deny and each DryRun
//! match is logged with the deciding policy and rule, and counted per policy. Admitted
//! connections stay registered until they end, so that a policy change can close the ones it
//! now denies.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use mesh_model::{
    authz::{Decision, Source},
    Action, Mode, SpiffeId,
};
use tokio_util::sync::CancellationToken;

use super::directory::Directory;
use crate::workloads::WorkloadId;

/// A connection to authorize.
#[derive(Debug, Clone)]
pub struct Request {
    pub destination: WorkloadId,
    /// The application's address and port in the destination pod.
    pub destination_addr: SocketAddr,
    pub source_addr: SocketAddr,
    /// The client's verified identity; `None` for plaintext.
    pub source_identity: Option<SpiffeId>,
    pub connection_id: u64,
}

/// Per-policy decision counters: (policy, rule, action, mode) → count.
pub type DecisionKey = (String, String, Action, Mode);

#[derive(Default)]
pub struct Authz {
    /// Admitted connections by an id of this registry's own: a tunnelled connection's id
    /// comes from its peer, which could reuse one to push another out of the re-checks.
    open: Mutex<HashMap<u64, Open>>,
    next_id: AtomicU64,
    decisions: Mutex<BTreeMap<DecisionKey, u64>>,
    closed_by_policy: AtomicU64,
}

struct Open {
    request: Request,
    cancel: CancellationToken,
}

/// Registration of an admitted connection; unregisters on drop. Its token fires when a policy
/// change denies the connection.
pub struct OpenGuard {
    authz: Arc<Authz>,
    id: u64,
    cancel: CancellationToken,
    /// What the delivery needs kept for as long as the connection is open: the destination
    /// pod's return routing, when the application sees the source's address.
    routing: Option<crate::transparent::InUse>,
}

impl OpenGuard {
    pub fn closed(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Keeps `routing` until the connection ends.
    pub fn keep(&mut self, routing: Option<crate::transparent::InUse>) {
        self.routing = routing;
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.authz.lock_open().remove(&self.id);
    }
}

impl Authz {
    /// Evaluates, counts and logs one connection. Does not register it.
    pub fn check(&self, dir: &Directory, req: &Request) -> Decision {
        let decision = evaluate(dir, req);
        self.count(&decision);
        if !decision.allowed {
            tracing::warn!(
                destination = %req.destination, port = req.destination_addr.port(),
                source_identity = %display_identity(req), source = %req.source_addr,
                policy = %decision.policy_name(), rule = %decision.rule_name(),
                id = req.connection_id, decision = %decision, "connection denied"
            );
        }
        for hit in &decision.dry_run {
            tracing::info!(
                destination = %req.destination, port = req.destination_addr.port(),
                source_identity = %display_identity(req), source = %req.source_addr,
                policy = %hit.policy, rule = hit.rule, action = %hit.action,
                id = req.connection_id, enforced = %if decision.allowed { "allowed" } else { "denied" },
                "dry-run policy matched (not enforced)"
            );
        }
        decision
    }

    /// Registers an admitted connection for re-checks on policy changes. Its token is a child
    /// of `within` (a tunnel's trust token) when given, so that the connection ends with that
    /// too.
    pub fn admit(
        self: &Arc<Self>,
        request: Request,
        within: Option<&CancellationToken>,
    ) -> OpenGuard {
        let cancel = within.map_or_else(CancellationToken::new, CancellationToken::child_token);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock_open().insert(
            id,
            Open {
                request,
                cancel: cancel.clone(),
            },
        );
        OpenGuard {
            authz: self.clone(),
            id,
            cancel,
            routing: None,
        }
    }

    /// Closes the open connections that `dir`'s policies deny.
    pub fn recheck(&self, dir: &Directory) {
        let open: Vec<(Request, CancellationToken)> = self
            .lock_open()
            .values()
            .map(|o| (o.request.clone(), o.cancel.clone()))
            .collect();
        for (req, cancel) in open {
            let decision = evaluate(dir, &req);
            if decision.allowed {
                continue;
            }
            self.count(&decision);
            self.closed_by_policy.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                destination = %req.destination, port = req.destination_addr.port(),
                source_identity = %display_identity(&req), source = %req.source_addr,
                policy = %decision.policy_name(), rule = %decision.rule_name(),
                id = req.connection_id, decision = %decision,
                "open connection closed: a policy change denies it"
            );
            cancel.cancel();
        }
    }

    /// The connections admitted and still open.
    pub fn open_connections(&self) -> Vec<Request> {
        self.lock_open()
            .values()
            .map(|o| o.request.clone())
            .collect()
    }

    /// Open connections closed so far because a policy change denies them.
    pub fn closed_by_policy(&self) -> u64 {
        self.closed_by_policy.load(Ordering::Relaxed)
    }

    /// Decisions so far: (policy, rule, action, mode) → count.
    pub fn decision_counts(&self) -> Vec<(DecisionKey, u64)> {
        let decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        decisions.iter().map(|(k, n)| (k.clone(), *n)).collect()
    }

    fn count(&self, d: &Decision) {
        let mut decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        let key = (d.policy_name(), d.rule_name(), d.action(), Mode::Enforce);
        *decisions.entry(key).or_default() += 1;
        for hit in &d.dry_run {
            let key = (
                hit.policy.to_string(),
                hit.rule.to_string(),
                hit.action,
                hit.mode,
            );
            *decisions.entry(key).or_default() += 1;
        }
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn evaluate(dir: &Directory, req: &Request) -> Decision {
    with_source(dir, req, |src| {
        dir.policies()
            .evaluate(&req.destination, req.destination_addr.port(), src)
    })
}

/// Runs `f` with the request's client as policies see it.
pub fn with_source<R>(dir: &Directory, req: &Request, f: impl FnOnce(&Source<'_>) -> R) -> R {
    // The client workload is the one at the source address, and only if it holds the verified
    // identity (deliveries check this before asking; a re-check may find the address reused).
    let peer = req.source_identity.as_ref().and_then(|id| {
        dir.peer_by_addr(req.source_addr.ip())
            .filter(|p| &p.identity == id)
    });
    let no_labels = BTreeMap::new();
    let identity_uri = req.source_identity.as_ref().map(ToString::to_string);
    let workload = match (peer, &req.source_identity, &identity_uri) {
        (Some(p), _, _) => Some(p.as_source()),
        // The identity is verified but its workload left the view: no labels to match.
        (None, Some(id), Some(uri)) => Some(mesh_model::authz::SourceWorkload {
            identity: uri,
            namespace: &id.namespace,
            labels: &no_labels,
        }),
        _ => None,
    };
    f(&Source {
        address: req.source_addr.ip(),
        workload,
    })
}

fn display_identity(req: &Request) -> String {
    req.source_identity
        .as_ref()
        .map_or_else(|| "none (plaintext)".to_owned(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 19 review): admitted connections were keyed by the connection id a
    /// tunnel's peer chose; a second connection with the same id, once closed, took the first
    /// out of the policy re-checks.
    #[test]
    fn connections_with_the_same_peer_id_are_both_registered() {
        let authz = Arc::new(Authz::default());
        let request = Request {
            destination: WorkloadId::new("default", "server"),
            destination_addr: "10.0.0.2:8080".parse().unwrap(),
            source_addr: "10.0.0.1:40000".parse().unwrap(),
            source_identity: None,
            connection_id: 7,
        };
        let first = authz.admit(request.clone(), None);
        let second = authz.admit(request, None);
        drop(second);
        assert_eq!(authz.lock_open().len(), 1, "the first is still re-checked");
        drop(first);
        assert!(authz.lock_open().is_empty());
    }
}
