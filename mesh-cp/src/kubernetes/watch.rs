//! One reflector per kind the adapter reads, each a kube-runtime watcher (list, then watch;
//! on `410 Gone` or a broken stream, list again) retried with backoff while the API is away.
//! Every change wakes the translation loop in `mod.rs`; the stores keep the last state seen,
//! so an API outage changes nothing in the mesh.

use std::{
    fmt::Debug,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{
        reflector::{self, store::Writer, Lookup, Store},
        utils::Backoff,
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::translate::Objects;
use mesh_model::crd::{AccessPolicy, MeshConfigResource};

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
    /// What a control plane uses against a real API server.
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

/// The state of the API as the watchers see it, for logs, `/status` and `/readyz`.
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

/// The stores of every watched kind.
#[derive(Clone)]
pub struct Stores {
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    policies: Store<DynamicObject>,
    meshes: Store<DynamicObject>,
}

impl Stores {
    /// Every object as the stores hold them now.
    pub fn objects(&self) -> Objects {
        Objects {
            pods: self.pods.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            namespaces: self.namespaces.state(),
            policies: self.policies.state(),
            meshes: self.meshes.state(),
        }
    }

    pub fn pods(&self) -> Store<Pod> {
        self.pods.clone()
    }

    /// Returns once every kind has been listed once.
    pub async fn ready(&self) {
        // A store's writer lives as long as its watch task, which never ends on its own.
        let _ = self.pods.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.policies.wait_until_ready().await;
        let _ = self.meshes.wait_until_ready().await;
    }
}

/// The resource of AccessPolicy, for the dynamic API (a policy that does not parse must not
/// break the watch: it is read as JSON and judged by the model).
pub fn access_policies() -> ApiResource {
    ApiResource::erase::<AccessPolicy>(&())
}

pub fn mesh_configs() -> ApiResource {
    ApiResource::erase::<MeshConfigResource>(&())
}

/// Starts the watches; `changed` is notified on every change of any kind.
pub fn start(
    client: &Client,
    retry: Retry,
    changed: Arc<Notify>,
    health: Arc<ApiHealth>,
) -> Stores {
    let w = Watch {
        retry,
        changed,
        health,
    };
    let (policies_ar, meshes_ar) = (access_policies(), mesh_configs());
    Stores {
        pods: w.spawn(
            "Pod",
            Api::all(client.clone()),
            Writer::default(),
            strip_pod,
        ),
        services: w.spawn(
            "Service",
            Api::all(client.clone()),
            Writer::default(),
            |_| {},
        ),
        slices: w.spawn(
            "EndpointSlice",
            Api::all(client.clone()),
            Writer::default(),
            |_| {},
        ),
        namespaces: w.spawn(
            "Namespace",
            Api::all(client.clone()),
            Writer::default(),
            |_| {},
        ),
        policies: w.spawn(
            "AccessPolicy",
            Api::all_with(client.clone(), &policies_ar),
            Writer::new(policies_ar.clone()),
            |_| {},
        ),
        meshes: w.spawn(
            "MeshConfig",
            Api::all_with(client.clone(), &meshes_ar),
            Writer::new(meshes_ar.clone()),
            |_| {},
        ),
    }
}

struct Watch {
    retry: Retry,
    changed: Arc<Notify>,
    health: Arc<ApiHealth>,
}

impl Watch {
    fn spawn<K>(
        &self,
        kind: &'static str,
        api: Api<K>,
        writer: Writer<K>,
        strip: fn(&mut K),
    ) -> Store<K>
    where
        K: Resource + Lookup + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        <K as Lookup>::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let store = writer.as_reader();
        let stream = watcher(api, watcher::Config::default())
            .modify(strip)
            .backoff(self.retry);
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
                            tracing::warn!(kind, error = %e, "watch of the Kubernetes API failed; retrying, the mesh keeps its last state");
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

/// Keeps only what translation reads of a pod: pods are the most numerous objects watched.
fn strip_pod(pod: &mut Pod) {
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
