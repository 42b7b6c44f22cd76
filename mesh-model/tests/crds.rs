//! The CRDs committed under `deploy/crds/` are what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for (file, crd) in mesh_model::crd::definitions() {
        let want = mesh_model::crd::render(&crd).unwrap();
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            have == want,
            "deploy/crds/{file} is out of date with mesh-model/src/spec.rs; run `cargo xtask crds` and commit the result"
        );
    }
}

#[test]
fn the_access_policy_schema_has_the_clauses_and_int_or_string_ports() {
    let (_, crd) = &mesh_model::crd::definitions()[0];
    let text = mesh_model::crd::render(crd).unwrap();
    for field in [
        "sourceIdentities",
        "notSourceIdentities",
        "sourceNamespaces",
        "sourceLabels",
        "notSourceCidrs",
        "notPorts",
        "x-kubernetes-int-or-string: true",
        "scope: Namespaced",
    ] {
        assert!(text.contains(field), "{field} missing from the CRD");
    }
}
