//! What `mesh-cp apply -f` reads: files and directories of YAML documents, each document one
//! object, checked as the config dir is before anything is written.

use std::path::{Path, PathBuf};

use mesh_model::{ConfigError, ObjectKey};

/// The most bytes one object may take in the store: etcd refuses a request over 1.5 MiB by
/// default, a page of reads must stay under `mesh_etcd::MAX_MESSAGE`, and an object this
/// large is a mistake.
pub const MAX_OBJECT: usize = 128 * 1024;

/// One object to write: its kind, key and YAML as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub kind: &'static str,
    pub key: Option<ObjectKey>,
    pub text: String,
    /// Where it was read: `FILE, document N`.
    pub origin: String,
}

impl Object {
    /// `KIND NAMESPACE/NAME`, or `KIND` for the MeshConfig.
    pub fn name(&self) -> String {
        match &self.key {
            Some(k) => format!("{} {k}", self.kind),
            None => self.kind.to_owned(),
        }
    }

    /// The objects of `files`, each file's in order. The files are checked together first, as
    /// a config dir of just them would be: an error names the file, the document and the
    /// field. (What they hold against the objects already in the store is checked when the
    /// two are put together.)
    pub fn all_of(files: &[(PathBuf, String)]) -> Result<Vec<Object>, ConfigError> {
        mesh_model::parse(files)?;
        let mut objects = Vec::new();
        for (file, text) in files {
            for document in mesh_model::yaml_documents(file, text) {
                let (doc, value) = document?;
                let invalid = |message: String| ConfigError::Invalid {
                    file: file.clone(),
                    doc,
                    message,
                };
                let resource = mesh_model::parse_document(value.clone()).map_err(invalid)?;
                let (kind, key) = resource.identity();
                // The parsed value written back: the store holds plain YAML, one object a
                // key, whatever the file's layout and comments were.
                let text = serde_yaml::to_string(&value)
                    .map_err(|e| invalid(format!("cannot write it back as YAML: {e}")))?;
                if text.len() > MAX_OBJECT {
                    return Err(invalid(format!(
                        "{} bytes, over the {MAX_OBJECT} an object may take",
                        text.len()
                    )));
                }
                objects.push(Object {
                    kind,
                    key: key.cloned(),
                    text,
                    origin: format!("{}, document {doc}", file.display()),
                });
            }
        }
        Ok(objects)
    }
}

/// The YAML files that `paths` name: a file as it is (whatever its extension), a directory's
/// `*.yaml` and `*.yml` files (not its subdirectories), in order.
pub fn read_inputs(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(mesh_model::read_dir(path)?);
        } else {
            files.push((path.clone(), read(path)?));
        }
    }
    Ok(files)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: { name: no-client, namespace: shop }\nspec: { selector: { matchLabels: { app: pay } }, action: Deny, rules: [{ sourceIdentities: ['spiffe://cluster.local/ns/shop/sa/client'] }] }\n";
    const MESH: &str = "apiVersion: mycel.dev/v1alpha1\nkind: MeshConfig\nmetadata: { name: mesh }\nspec: { transport: tls }\n";

    #[test]
    fn each_document_is_an_object_written_back_as_plain_yaml() {
        let text = format!("# a comment\n{POLICY}---\n{MESH}---\n");
        let objects = Object::all_of(&[(PathBuf::from("a.yaml"), text)]).unwrap();
        let names: Vec<String> = objects.iter().map(Object::name).collect();
        assert_eq!(names, ["AccessPolicy shop/no-client", "MeshConfig"]);
        assert!(!objects[0].text.contains("comment"));
        // What is written parses back to the same object.
        let again = Object::all_of(&[(PathBuf::from("b.yaml"), objects[0].text.clone())]).unwrap();
        assert_eq!(again[0].text, objects[0].text);
        assert_eq!(again[0].name(), objects[0].name());
        assert_eq!(objects[1].origin, "a.yaml, document 2");
    }

    #[test]
    fn a_bad_document_names_its_file_document_and_field() {
        let bad = POLICY.replace("action: Deny", "action: Maybe");
        let text = format!("{MESH}---\n{bad}");
        let err = Object::all_of(&[(PathBuf::from("p.yaml"), text)])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.yaml: document 2: "), "{err}");
        assert!(err.contains("action"), "{err}");
        // Two objects of one key in the input: the same error as in a config dir.
        let twice = format!("{POLICY}---\n{POLICY}");
        let err = Object::all_of(&[(PathBuf::from("t.yaml"), twice)]).unwrap_err();
        assert!(err.to_string().contains("document 2"), "{err}");
    }
}
