//! The workloads this node captures, whichever source they come from: the control plane's
//! config stream, or (offline mode) a local file of `Workload` documents in the same format
//! the control plane reads. A file is accepted whole or not at all.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

pub use mesh_model::ObjectKey as WorkloadId;

/// A workload this node must capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub id: WorkloadId,
    pub netns: PathBuf,
}

/// Reads the file; returns the workloads placed on `node`, keyed by id, and the text they
/// were read from (what a later change is compared with).
pub fn load(
    file: &Path,
    node: &str,
) -> Result<(BTreeMap<WorkloadId, Workload>, String), mesh_model::ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| mesh_model::ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    Ok((parse(file, &text, node)?, text))
}

/// The workloads placed on `node` in `text`, the contents of `file`.
pub fn parse(
    file: &Path,
    text: &str,
    node: &str,
) -> Result<BTreeMap<WorkloadId, Workload>, mesh_model::ConfigError> {
    let config = mesh_model::parse(&[(file.to_path_buf(), text.to_owned())])?;
    Ok(config
        .workloads_on(node)
        .map(|w| {
            (
                w.key.clone(),
                Workload {
                    id: w.key.clone(),
                    netns: w.netns.clone(),
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_this_nodes_workloads() {
        let dir = std::env::temp_dir().join(format!("mesh-node-wl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("w.yaml");
        std::fs::write(
            &file,
            "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: { name: a, namespace: shop }\nspec: { node: n1, netns: /run/netns/a }\n---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: { name: b }\nspec: { node: n2, netns: /run/netns/b }\n",
        )
        .unwrap();
        let w = load(&file, "n1");
        std::fs::write(&file, "apiVersion: [unclosed\n").unwrap();
        let bad = load(&file, "n1");
        std::fs::remove_dir_all(&dir).unwrap();
        let (w, _) = w.unwrap();
        assert_eq!(w.len(), 1);
        let a = w.values().next().unwrap();
        assert_eq!(a.id.to_string(), "shop/a");
        assert_eq!(a.netns, PathBuf::from("/run/netns/a"));
        assert!(bad.unwrap_err().to_string().contains("w.yaml: document 1"));
    }
}
