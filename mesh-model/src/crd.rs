//! The Kubernetes side of the spec types (feature `crd`): the custom resources kube-derive
//! generates in `spec.rs` and the status mesh-cp writes (both re-exported here), PortSpec's
//! schema, and the CRD files under `deploy/crds/`. Behind a feature because only the Kubernetes
//! control plane needs them: without it, mesh-model and the wire crate `mesh-api` build no kube,
//! k8s-openapi or schemars.

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::spec::PortSpec;
pub use crate::spec::{
    AccessPolicy, AccessPolicyStatus, MeshConfigResource, ServiceRoute, TrafficPolicy,
    TrafficStatus,
};

impl JsonSchema for PortSpec {
    fn schema_name() -> Cow<'static, str> {
        "PortSpec".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Kubernetes' own int-or-string convention, so `kubectl` and validators accept both.
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "type": "string", "pattern": "^[0-9]+(-[0-9]+)?$" }
            ]
        })
    }
}

/// Every CRD Mycel defines, with the file name it has under `deploy/crds/`.
pub fn definitions() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("accesspolicies.mycel.dev.yaml", AccessPolicy::crd()),
        ("meshconfigs.mycel.dev.yaml", MeshConfigResource::crd()),
        ("trafficpolicies.mycel.dev.yaml", TrafficPolicy::crd()),
        ("serviceroutes.mycel.dev.yaml", ServiceRoute::crd()),
    ]
}

/// The YAML text of a CRD as committed (a header line says it is generated).
pub fn render(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated from mesh-model/src/crd.rs by `cargo xtask crds`; do not edit.\n{}",
        serde_yaml::to_string(crd)?
    ))
}
