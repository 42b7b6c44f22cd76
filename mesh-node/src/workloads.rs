//! The workloads this node captures, whichever source they come from: the control plane's
//! config stream, or (offline mode) a local file of `Workload` documents in the same format
//! the control plane reads. A file is accepted whole or not at all; of its MeshConfig, offline
//! mode uses `localHop` (it has no tunnels, policies or plaintext delivery to configure).

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

/// What offline mode takes from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// The workloads placed on this node, by id.
    pub workloads: BTreeMap<WorkloadId, Workload>,
    /// The MeshConfig's `localHop` (its default without one).
    pub local_hop: mesh_model::LocalHop,
}

/// Reads the file; returns what it says for `node`, and the text it was read from (what a
/// later change is compared with).
pub fn load(file: &Path, node: &str) -> Result<(FileConfig, String), mesh_model::ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| mesh_model::ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    Ok((parse(file, &text, node)?, text))
}

/// What `text`, the contents of `file`, says for `node`.
pub fn parse(file: &Path, text: &str, node: &str) -> Result<FileConfig, mesh_model::ConfigError> {
    let config = mesh_model::parse(&[(file.to_path_buf(), text.to_owned())])?;
    let workloads = config
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
        .collect();
    Ok(FileConfig {
        workloads,
        local_hop: config.mesh.local_hop,
    })
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
        let (file_config, _) = w.unwrap();
        let w = file_config.workloads;
        assert_eq!(w.len(), 1);
        assert_eq!(file_config.local_hop, mesh_model::LocalHop::default());
        let a = w.values().next().unwrap();
        assert_eq!(a.id.to_string(), "shop/a");
        assert_eq!(a.netns, PathBuf::from("/run/netns/a"));
        assert!(bad.unwrap_err().to_string().contains("w.yaml: document 1"));
    }
}
