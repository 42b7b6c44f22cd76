//! Reflectors that survive the API server going away: a kube-runtime watcher (list, then
//! watch; on `410 Gone` or a broken stream, list again) retried with backoff, feeding a store
//! that keeps the last state seen. An outage therefore changes nothing downstream; it shows in
//! [`ApiHealth`] and in one log line when it starts and one when it ends.

use std::{
    fmt::Debug,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{
        reflector::{self, store::Writer, Lookup, Store},
        utils::Backoff,
        watcher, WatchStreamExt,
    },
    Api, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

/// Exponential retry delays, from `first` doubling up to `max`; reset once a watch works.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    next: Duration,
}

impl Retry {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }
}

impl Default for Retry {
    /// What a daemon uses against a real API server.
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(now)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// The state of the API as the watchers see it, for logs and status pages.
#[derive(Debug, Default)]
pub struct ApiHealth {
    /// The last watch error, while watches are failing.
    last_error: Mutex<Option<String>>,
}

impl ApiHealth {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

/// What every reflector of one daemon shares: how to retry, whom to wake on a change, and
/// where to report failures.
#[derive(Clone)]
pub struct Reflectors {
    pub retry: Retry,
    /// Notified on every change of any store.
    pub changed: Arc<Notify>,
    pub health: Arc<ApiHealth>,
}

impl Reflectors {
    /// Starts watching `api` with `config` into a new store; `strip` trims each object before
    /// it is stored (to save memory on numerous kinds).
    pub fn spawn<K>(
        &self,
        kind: &'static str,
        api: Api<K>,
        config: watcher::Config,
        writer: Writer<K>,
        strip: fn(&mut K),
    ) -> Store<K>
    where
        K: Resource + Lookup + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        <K as Lookup>::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let store = writer.as_reader();
        let stream = watcher(api, config).modify(strip).backoff(self.retry);
        let stream = reflector::reflector(writer, stream);
        let (changed, health) = (self.changed.clone(), self.health.clone());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => {
                        if failing {
                            tracing::info!(kind, "watch of the Kubernetes API works again");
                            failing = false;
                            health.set(None);
                        }
                        changed.notify_one();
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(kind, error = %e, "watch of the Kubernetes API failed; retrying, keeping the last state");
                            failing = true;
                        }
                        health.set(Some(format!("{kind}: {e}")));
                    }
                }
            }
        });
        store
    }
}

/// Keeps only what the mesh reads of a pod (metadata, placement, addresses, phase): pods are
/// the most numerous objects watched.
pub fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.clear();
        spec.init_containers = None;
        spec.volumes = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.conditions = None;
    }
}
