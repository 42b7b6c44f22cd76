//! `mycel policies`: each AccessPolicy in force, and the workloads it selects (mesh-cp's
//! `/policies`, evaluated on the config in force, as the nodes enforce it).

use mesh_telemetry::client::{self, ClientError};
use serde::{Deserialize, Serialize};

use crate::table;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policies {
    pub config_version: u64,
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub key: String,
    pub action: String,
    pub mode: String,
    pub rules: usize,
    /// In the root namespace: it selects across the mesh.
    pub mesh_wide: bool,
    pub selects: Vec<String>,
}

pub fn fetch(cp: &str) -> Result<Policies, ClientError> {
    client::get_json(cp, "/policies")
}

pub fn render(p: &Policies) -> String {
    if p.policies.is_empty() {
        return format!(
            "no AccessPolicy in config version {}: the mesh's default action decides\n",
            p.config_version
        );
    }
    let rows: Vec<Vec<String>> = p
        .policies
        .iter()
        .map(|p| {
            let selects = match p.selects.len() {
                0 => "nothing (no workload carries its selector's labels)".to_owned(),
                _ => p.selects.join(", "),
            };
            vec![
                p.key.clone(),
                p.action.clone(),
                p.mode.clone(),
                p.rules.to_string(),
                if p.mesh_wide { "mesh" } else { "namespace" }.to_owned(),
                selects,
            ]
        })
        .collect();
    table::render(
        &["POLICY", "ACTION", "MODE", "RULES", "SCOPE", "SELECTS"],
        &rows,
    )
}
