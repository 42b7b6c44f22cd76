//! Which of this node's pods to capture: in the mesh by `mesh_model::membership` (the rule
//! mesh-cp applies too), with an identity it can be given, and running in a network of their
//! own.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use mesh_model::membership::{in_mesh, no_identity, MESH_LABEL};

use crate::workloads::WorkloadId;

/// A pod this node must capture once it knows the pod's netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: WorkloadId,
    pub uid: String,
}

/// The object's own [`MESH_LABEL`] value, if it has one.
pub fn mesh_label(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<&str> {
    meta.labels.as_ref()?.get(MESH_LABEL).map(String::as_str)
}

/// The pod as a member, or `None` when it stays uncaptured: out of the mesh, without an
/// identity it can be given ([`refused`]), on the host's network (there is no pod netns to
/// capture), or finished.
pub fn member(pod: &Pod, namespace: Option<&Namespace>) -> Option<Member> {
    if !in_mesh(
        mesh_label(&pod.metadata),
        namespace.and_then(|ns| mesh_label(&ns.metadata)),
    ) || refused(pod, namespace).is_some()
    {
        return None;
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(Member {
        id: WorkloadId::new(
            pod.metadata.namespace.as_deref()?,
            pod.metadata.name.as_deref()?,
        ),
        uid: pod.metadata.uid.clone()?,
    })
}

/// Why a pod that asks for the mesh is not captured: it can have no identity (see
/// `mesh_model::membership::no_identity`). `None` for every other pod.
pub fn refused(pod: &Pod, namespace: Option<&Namespace>) -> Option<&'static str> {
    let asks = in_mesh(
        mesh_label(&pod.metadata),
        namespace.and_then(|ns| mesh_label(&ns.metadata)),
    );
    if !asks {
        return None;
    }
    no_identity(
        pod.metadata.annotations.as_ref(),
        pod.spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref()),
    )
}

/// Every member among `pods`, and the pods that asked for the mesh but were refused, with
/// their uid and the reason.
pub fn members<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: &[std::sync::Arc<Namespace>],
) -> (Vec<Member>, Vec<(WorkloadId, String, &'static str)>) {
    let by_name: std::collections::HashMap<&str, &Namespace> = namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, &**n)))
        .collect();
    let (mut found, mut refusals) = (Vec::new(), Vec::new());
    for pod in pods {
        let ns = pod.metadata.namespace.as_deref();
        let namespace = ns.and_then(|ns| by_name.get(ns).copied());
        if let Some(m) = member(pod, namespace) {
            found.push(m);
        } else if let (Some(reason), Some(ns), Some(name), Some(uid)) = (
            refused(pod, namespace),
            ns,
            pod.metadata.name.as_deref(),
            pod.metadata.uid.clone(),
        ) {
            refusals.push((WorkloadId::new(ns, name), uid, reason));
        }
    }
    (found, refusals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn pod(ns: &str, name: &str, extra: serde_json::Value) -> Pod {
        let mut v = json!({
            "metadata": { "namespace": ns, "name": name, "uid": format!("u-{name}") },
            "spec": { "nodeName": "n1", "serviceAccountName": "default", "containers": [] },
            "status": { "phase": "Running" },
        });
        for (k, e) in extra.as_object().unwrap() {
            for (f, x) in e.as_object().unwrap() {
                v[k][f] = x.clone();
            }
        }
        serde_json::from_value(v).unwrap()
    }

    fn namespace(name: &str, mesh: Option<&str>) -> Arc<Namespace> {
        let labels = mesh.map_or(json!({}), |m| json!({ MESH_LABEL: m }));
        Arc::new(
            serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } }))
                .unwrap(),
        )
    }

    #[test]
    fn members_are_meshed_pods_with_a_network_of_their_own_still_running() {
        let namespaces = [namespace("shop", Some("enabled")), namespace("ops", None)];
        let pods = [
            pod("shop", "order", json!({})),
            pod(
                "shop",
                "opted-out",
                json!({ "metadata": { "labels": { MESH_LABEL: "disabled" } } }),
            ),
            pod("shop", "host", json!({ "spec": { "hostNetwork": true } })),
            pod(
                "shop",
                "done",
                json!({ "status": { "phase": "Succeeded" } }),
            ),
            pod("ops", "tool", json!({})),
            pod(
                "ops",
                "agent",
                json!({ "metadata": { "labels": { MESH_LABEL: "enabled" } } }),
            ),
            // Its namespace is not known (yet): only its own label counts.
            pod("new", "x", json!({})),
            pod(
                "shop",
                "static",
                json!({ "metadata": { "annotations": { "kubernetes.io/config.mirror": "h" } } }),
            ),
            pod(
                "shop",
                "anon",
                json!({ "spec": { "serviceAccountName": "" } }),
            ),
        ];
        let (found, refused) = members(&pods, &namespaces);
        let got: Vec<String> = found
            .into_iter()
            .map(|m| format!("{} {}", m.id, m.uid))
            .collect();
        assert_eq!(got, ["shop/order u-order", "ops/agent u-agent"]);
        let refused: Vec<String> = refused.iter().map(|(id, _, _)| id.to_string()).collect();
        assert_eq!(refused, ["shop/static", "shop/anon"]);
    }
}
