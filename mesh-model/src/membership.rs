//! Which Kubernetes pods are in the mesh. The control plane (which turns pods into workloads)
//! and the node daemon (which captures a pod when its network is set up, before the control
//! plane has seen its address) must answer alike, so the rule lives here once.

/// The label, on a namespace or a pod, that puts pods in the mesh (`enabled`) or keeps one
/// out (any other value, `disabled` by convention).
pub const MESH_LABEL: &str = "mycel.dev/mesh";

/// The annotation the kubelet sets on the API object that mirrors a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod in the mesh can have no identity, and so is neither given one nor captured:
/// - a mirror pod stands for a static pod, which the kubelet runs from a file on its node:
///   the API server did not admit it, so nothing vouches for the service account it names,
///   and whoever can write that file could claim any identity of its namespace;
/// - a pod that names no service account has no identity to be given (the API server's
///   admission always sets one; a pod without is one that bypassed it).
pub fn no_identity(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    service_account: Option<&str>,
) -> Option<&'static str> {
    if annotations.is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)) {
        return Some(
            "it mirrors a static pod (annotation kubernetes.io/config.mirror), which nothing vouches for: static pods get no mesh identity",
        );
    }
    if service_account.is_none_or(str::is_empty) {
        return Some("it names no service account, which a mesh identity is made of");
    }
    None
}

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
    fn mirror_pods_and_pods_without_a_service_account_get_no_identity() {
        let mirror = [(MIRROR_ANNOTATION.to_owned(), "abc".to_owned())].into();
        let other = [("x".to_owned(), "y".to_owned())].into();
        assert!(no_identity(Some(&mirror), Some("default")).is_some());
        assert!(no_identity(Some(&other), None).is_some());
        assert!(no_identity(None, Some("")).is_some());
        assert_eq!(no_identity(Some(&other), Some("web")), None);
        assert_eq!(no_identity(None, Some("default")), None);
    }

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
