//! Which Kubernetes pods are in the mesh. The control plane (which turns pods into workloads)
//! and the node daemon (which captures a pod when its network is set up, before the control
//! plane has seen its address) must answer alike, so the rule lives here once.

/// The label, on a namespace or a pod, that puts pods in the mesh (`enabled`) or keeps one
/// out (any other value, `disabled` by convention).
pub const MESH_LABEL: &str = "mycel.dev/mesh";

/// Whether a pod is in the mesh, from the values of [`MESH_LABEL`] on the pod and on its
/// namespace: the pod's own label wins; without one, the namespace's decides.
pub fn in_mesh(pod_label: Option<&str>, namespace_label: Option<&str>) -> bool {
    match pod_label {
        Some(value) => value == "enabled",
        None => namespace_label == Some("enabled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_label_wins_over_its_namespaces() {
        assert!(in_mesh(None, Some("enabled")));
        assert!(in_mesh(Some("enabled"), None));
        assert!(in_mesh(Some("enabled"), Some("disabled")));
        assert!(!in_mesh(Some("disabled"), Some("enabled")));
        assert!(!in_mesh(Some("yes"), Some("enabled")));
        assert!(!in_mesh(None, Some("disabled")));
        assert!(!in_mesh(None, None));
    }
}
