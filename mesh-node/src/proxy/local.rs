//! The pods enrolled on this node, as the proxy finds them for deliveries between two of them.
//!
//! The enroller is their one owner: it holds the only [`LocalPodsOwner`] and adds a pod once
//! its listeners are up, removes it when it stops. Everything else (the outbound proxy, the
//! admin endpoint) holds a [`LocalPods`], which only reads.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, RwLockWriteGuard},
};

use super::PodContext;
use crate::workloads::WorkloadId;

type Map = HashMap<WorkloadId, Arc<PodContext>>;

/// Reads the enrolled pods.
#[derive(Clone)]
pub struct LocalPods(Arc<RwLock<Map>>);

/// Adds and removes enrolled pods; one per daemon, held by the enroller.
pub struct LocalPodsOwner(Arc<RwLock<Map>>);

/// A new, empty set of local pods: its owner and a reader (clone it for more).
pub fn local_pods() -> (LocalPodsOwner, LocalPods) {
    let map = Arc::new(RwLock::default());
    (LocalPodsOwner(map.clone()), LocalPods(map))
}

impl LocalPods {
    pub fn get(&self, id: &WorkloadId) -> Option<Arc<PodContext>> {
        // A panic elsewhere while holding the lock leaves the map as it was: read it anyway.
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

impl LocalPodsOwner {
    pub fn insert(&self, ctx: Arc<PodContext>) {
        self.write().insert(ctx.workload.clone(), ctx);
    }

    pub fn remove(&self, id: &WorkloadId) {
        self.write().remove(id);
    }

    fn write(&self) -> RwLockWriteGuard<'_, Map> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}
