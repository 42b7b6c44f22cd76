//! One reflector per kind the adapter reads (`mesh_kube::reflect`: list, then watch, list
//! again after `410 Gone`, retried with backoff while the API is away). Every change wakes the
//! translation loop in `mod.rs`; the stores keep the last state seen, so an API outage changes
//! nothing in the mesh.

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{
        reflector::{store::Writer, Store},
        watcher,
    },
    Api, Client,
};
use mesh_kube::Reflectors;
pub use mesh_kube::{ApiHealth, Retry};
use tokio::sync::Notify;

use super::translate::Objects;
use mesh_model::crd::{AccessPolicy, MeshConfigResource, ServiceRoute, TrafficPolicy};

/// The stores of every watched kind.
#[derive(Clone)]
pub struct Stores {
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    policies: Store<DynamicObject>,
    meshes: Store<DynamicObject>,
    traffic_policies: Store<DynamicObject>,
    routes: Store<DynamicObject>,
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
            traffic_policies: self.traffic_policies.state(),
            routes: self.routes.state(),
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
        let _ = self.traffic_policies.wait_until_ready().await;
        let _ = self.routes.wait_until_ready().await;
    }
}

/// The resource of AccessPolicy, for the dynamic API (a policy that does not parse must not
/// break the watch: it is read as JSON and judged by the model). Likewise for Mycel's other
/// kinds below.
pub fn access_policies() -> ApiResource {
    ApiResource::erase::<AccessPolicy>(&())
}

pub fn mesh_configs() -> ApiResource {
    ApiResource::erase::<MeshConfigResource>(&())
}

pub fn traffic_policies() -> ApiResource {
    ApiResource::erase::<TrafficPolicy>(&())
}

pub fn service_routes() -> ApiResource {
    ApiResource::erase::<ServiceRoute>(&())
}

/// Watches every object of one of Mycel's kinds, cluster-wide, as JSON.
fn custom(
    w: &Reflectors,
    client: &Client,
    kind: &'static str,
    ar: ApiResource,
) -> Store<DynamicObject> {
    w.spawn(
        kind,
        Api::all_with(client.clone(), &ar),
        watcher::Config::default(),
        Writer::new(ar),
        |_| {},
    )
}

/// Starts the watches; `changed` is notified on every change of any kind.
pub fn start(
    client: &Client,
    retry: Retry,
    changed: Arc<Notify>,
    health: Arc<ApiHealth>,
) -> Stores {
    let w = Reflectors {
        retry,
        changed,
        health,
    };
    Stores {
        pods: w.spawn(
            "Pod",
            Api::all(client.clone()),
            watcher::Config::default(),
            Writer::default(),
            mesh_kube::reflect::strip_pod,
        ),
        services: w.spawn(
            "Service",
            Api::all(client.clone()),
            watcher::Config::default(),
            Writer::default(),
            |_| {},
        ),
        slices: w.spawn(
            "EndpointSlice",
            Api::all(client.clone()),
            watcher::Config::default(),
            Writer::default(),
            |_| {},
        ),
        namespaces: w.spawn(
            "Namespace",
            Api::all(client.clone()),
            watcher::Config::default(),
            Writer::default(),
            |_| {},
        ),
        policies: custom(&w, client, "AccessPolicy", access_policies()),
        meshes: custom(&w, client, "MeshConfig", mesh_configs()),
        traffic_policies: custom(&w, client, "TrafficPolicy", traffic_policies()),
        routes: custom(&w, client, "ServiceRoute", service_routes()),
    }
}
