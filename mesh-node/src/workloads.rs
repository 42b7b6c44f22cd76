//! The local workloads file: `Workload` documents naming the node they run on and their netns.
//!
//! This is the offline source of enrollment until the control plane pushes workloads. A file is
//! accepted whole or not at all: any error leaves the previously applied set in force.
//!
//! ```yaml
//! apiVersion: mycel.dev/v1alpha1
//! kind: Workload
//! metadata: { name: web, namespace: shop }
//! spec: { node: node-1, netns: /run/netns/web }
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const API_VERSION: &str = "mycel.dev/v1alpha1";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A workload this node must capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub id: WorkloadId,
    pub netns: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: document {doc}: {message}")]
    Invalid {
        file: PathBuf,
        doc: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    node: String,
    netns: PathBuf,
}

/// Reads the file and returns the workloads placed on `node`, keyed by id.
pub fn load(file: &Path, node: &str) -> Result<BTreeMap<WorkloadId, Workload>, WorkloadsError> {
    let text = std::fs::read_to_string(file).map_err(|source| WorkloadsError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse(file, &text, node)
}

pub fn parse(
    file: &Path,
    text: &str,
    node: &str,
) -> Result<BTreeMap<WorkloadId, Workload>, WorkloadsError> {
    let invalid = |doc: usize, message: String| WorkloadsError::Invalid {
        file: file.to_path_buf(),
        doc,
        message,
    };
    let mut out = BTreeMap::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = index + 1;
        let value =
            serde_yaml::Value::deserialize(de).map_err(|e| invalid(doc_no, one_line(&e)))?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let doc: Document =
            serde_yaml::from_value(value).map_err(|e| invalid(doc_no, one_line(&e)))?;
        if doc.api_version != API_VERSION {
            return Err(invalid(
                doc_no,
                format!(
                    "apiVersion: expected {API_VERSION}, found {}",
                    doc.api_version
                ),
            ));
        }
        if doc.kind != "Workload" {
            return Err(invalid(
                doc_no,
                format!("kind: expected Workload, found {}", doc.kind),
            ));
        }
        for (field, value) in [
            ("metadata.name", &doc.metadata.name),
            ("metadata.namespace", &doc.metadata.namespace),
            ("spec.node", &doc.spec.node),
        ] {
            if !is_dns_label(value) {
                return Err(invalid(
                    doc_no,
                    format!("{field}: {value:?} is not a DNS label (a-z, 0-9, '-', at most 63)"),
                ));
            }
        }
        if !doc.spec.netns.is_absolute() {
            return Err(invalid(
                doc_no,
                format!(
                    "spec.netns: {} is not an absolute path",
                    doc.spec.netns.display()
                ),
            ));
        }
        if doc.spec.node != node {
            continue;
        }
        let id = WorkloadId {
            namespace: doc.metadata.namespace,
            name: doc.metadata.name,
        };
        if out.contains_key(&id) {
            return Err(invalid(doc_no, format!("workload {id} is defined twice")));
        }
        let netns_taken = out.values().any(|w: &Workload| w.netns == doc.spec.netns);
        if netns_taken {
            return Err(invalid(
                doc_no,
                format!(
                    "spec.netns: {} is already used by another workload",
                    doc.spec.netns.display()
                ),
            ));
        }
        out.insert(
            id.clone(),
            Workload {
                id,
                netns: doc.spec.netns,
            },
        );
    }
    Ok(out)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// serde_yaml errors can span lines; the operator gets one.
fn one_line(e: &impl fmt::Display) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<BTreeMap<WorkloadId, Workload>, WorkloadsError> {
        parse(Path::new("w.yaml"), text, "n1")
    }

    const GOOD: &str = "\
apiVersion: mycel.dev/v1alpha1
kind: Workload
metadata: { name: a, namespace: shop }
spec: { node: n1, netns: /run/netns/a }
---
apiVersion: mycel.dev/v1alpha1
kind: Workload
metadata: { name: b }
spec: { node: n2, netns: /run/netns/b }
---
";

    #[test]
    fn keeps_only_this_nodes_workloads() {
        let w = p(GOOD).unwrap();
        assert_eq!(w.len(), 1);
        let a = w.values().next().unwrap();
        assert_eq!(a.id.to_string(), "shop/a");
        assert_eq!(a.netns, PathBuf::from("/run/netns/a"));
    }

    #[test]
    fn empty_file_is_no_workloads() {
        assert!(p("").unwrap().is_empty());
    }

    fn err(text: &str) -> String {
        let e = p(text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "error spans lines: {e}");
        e
    }

    #[test]
    fn rejects_unknown_fields_naming_them() {
        let e = err("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x, nets: 1}\n");
        assert!(
            e.contains("w.yaml: document 1") && e.contains("nets"),
            "{e}"
        );
    }

    #[test]
    fn rejects_malformed_yaml() {
        let e = err("apiVersion: [unclosed\n");
        assert!(e.starts_with("w.yaml: document 1:"), "{e}");
    }

    #[test]
    fn rejects_wrong_kind_version_and_names() {
        assert!(err(
            "apiVersion: v9\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x}\n"
        )
        .contains("apiVersion"));
        assert!(err("apiVersion: mycel.dev/v1alpha1\nkind: Pod\nmetadata: {name: a}\nspec: {node: n1, netns: /x}\n").contains("kind"));
        assert!(err("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: A_b}\nspec: {node: n1, netns: /x}\n").contains("metadata.name"));
        assert!(err("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: rel}\n").contains("spec.netns"));
    }

    #[test]
    fn rejects_duplicates() {
        let doc = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, netns: /x}\n";
        assert!(err(&format!("{doc}---\n{doc}")).contains("defined twice"));
        let other = doc.replace("name: a", "name: b");
        assert!(err(&format!("{doc}---\n{other}")).contains("already used"));
    }
}
