//! `mesh-cp apply` and `mesh-cp delete` against a config dir (`--config-dir`), so that one
//! command serves a single control plane and replicas on etcd alike.
//!
//! What they write is one file of the directory, `applied.yaml`, replaced whole by a rename:
//! the control plane, which reads the directory every interval, sees a change whole or not at
//! all. An object that a hand-written file defines is left to that file (apply and delete
//! refuse it, naming the file), so that the two never hold one object twice. The directory
//! with the change made is checked as the control plane will check it, and nothing is
//! written unless it passes. Two applies at once take turns (a lock file beside it).

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use mesh_model::{ConfigError, ObjectKey};

use crate::store::{apply::Outcome, Object};

/// The file apply writes.
pub const FILE: &str = "applied.yaml";
const LOCK: &str = ".applied.lock";
const HEADER: &str =
    "# Written by `mesh-cp apply` and `mesh-cp delete`: change it with them, not by hand.\n";

#[derive(Debug, thiserror::Error)]
pub enum DirApplyError {
    #[error("nothing was written: the config dir cannot be read as it is: {0}")]
    Read(ConfigError),
    #[error("nothing was written: with this change the config dir would be invalid: {0}")]
    Invalid(ConfigError),
    #[error("nothing was written: {object} is defined in {file}, which apply leaves alone: change it there")]
    Elsewhere { object: String, file: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What an apply or delete did to the directory: each object's outcome, and the file written
/// (none when nothing changed).
#[derive(Debug)]
pub struct DirReport {
    pub objects: Vec<(String, Outcome)>,
    pub written: Option<PathBuf>,
}

/// One object of `applied.yaml`, by its kind and key.
type Applied = BTreeMap<(String, Option<ObjectKey>), String>;

/// Writes `objects` into the directory's `applied.yaml`: new ones added, those it holds
/// replaced.
pub fn apply(dir: &Path, objects: &[Object]) -> Result<DirReport, DirApplyError> {
    write(dir, |applied, elsewhere| {
        let mut outcomes = Vec::with_capacity(objects.len());
        for o in objects {
            let id = (o.kind.to_owned(), o.key.clone());
            if let Some(file) = elsewhere.get(&id) {
                return Err(DirApplyError::Elsewhere {
                    object: o.name(),
                    file: file.clone(),
                });
            }
            let outcome = match applied.insert(id, o.text.clone()) {
                None => Outcome::Created,
                Some(old) if old == o.text => Outcome::Unchanged,
                Some(_) => Outcome::Configured,
            };
            outcomes.push((o.name(), outcome));
        }
        Ok(outcomes)
    })
}

/// Removes the objects `targets` name from `applied.yaml`.
pub fn delete(
    dir: &Path,
    targets: &[(&'static str, Option<ObjectKey>)],
) -> Result<DirReport, DirApplyError> {
    write(dir, |applied, elsewhere| {
        let mut outcomes = Vec::with_capacity(targets.len());
        for (kind, key) in targets {
            let id = ((*kind).to_owned(), key.clone());
            let name = match key {
                Some(k) => format!("{kind} {k}"),
                None => (*kind).to_owned(),
            };
            if let Some(file) = elsewhere.get(&id) {
                return Err(DirApplyError::Elsewhere {
                    object: name,
                    file: file.clone(),
                });
            }
            let outcome = match applied.remove(&id) {
                Some(_) => Outcome::Deleted,
                None => Outcome::Absent,
            };
            outcomes.push((name, outcome));
        }
        Ok(outcomes)
    })
}

type Elsewhere = BTreeMap<(String, Option<ObjectKey>), PathBuf>;

fn write(
    dir: &Path,
    change: impl FnOnce(&mut Applied, &Elsewhere) -> Result<Vec<(String, Outcome)>, DirApplyError>,
) -> Result<DirReport, DirApplyError> {
    let _turn = lock(dir)?;
    let path = dir.join(FILE);
    let mut files = mesh_model::read_dir(dir).map_err(DirApplyError::Read)?;
    let (mut applied, mut elsewhere) = (Applied::new(), Elsewhere::new());
    for (file, text) in &files {
        for document in mesh_model::yaml_documents(file, text) {
            let (doc, value) = document.map_err(DirApplyError::Read)?;
            let resource = mesh_model::parse_document(value.clone()).map_err(|message| {
                DirApplyError::Read(ConfigError::Invalid {
                    file: file.clone(),
                    doc,
                    message,
                })
            })?;
            let (kind, key) = resource.identity();
            let id = (kind.to_owned(), key.cloned());
            if *file == path {
                let text = serde_yaml::to_string(&value).map_err(|e| {
                    DirApplyError::Read(ConfigError::Invalid {
                        file: file.clone(),
                        doc,
                        message: format!("cannot write it back as YAML: {e}"),
                    })
                })?;
                applied.insert(id, text);
            } else {
                elsewhere.insert(id, file.clone());
            }
        }
    }
    let before = applied.clone();
    let objects = change(&mut applied, &elsewhere)?;
    if applied == before {
        return Ok(DirReport {
            objects,
            written: None,
        });
    }
    let mut text = HEADER.to_owned();
    for doc in applied.values() {
        text.push_str("---\n");
        text.push_str(doc);
    }
    match files.iter_mut().find(|(f, _)| *f == path) {
        Some((_, old)) => *old = text.clone(),
        None => files.push((path.clone(), text.clone())),
    }
    mesh_model::parse(&files).map_err(DirApplyError::Invalid)?;
    crate::files::replace(
        &path,
        &dir.join(".applied.yaml.tmp"),
        text.as_bytes(),
        0o644,
    )
    .map_err(|(path, source)| DirApplyError::Write { path, source })?;
    Ok(DirReport {
        objects,
        written: Some(path),
    })
}

/// This apply's turn: an exclusive lock on a file beside `applied.yaml`, released on drop.
fn lock(dir: &Path) -> Result<File, DirApplyError> {
    let path = dir.join(LOCK);
    let werr = |source| DirApplyError::Write {
        path: path.clone(),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(werr)?;
    // SAFETY: flock on an fd this function owns; released when the file is dropped.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(werr(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: { name: NAME, namespace: shop }\nspec: { selector: { matchLabels: { app: pay } }, action: ACTION, rules: [{ sourceIdentities: ['spiffe://cluster.local/ns/shop/sa/client'] }] }\n";

    fn policy(name: &str, action: &str) -> Vec<Object> {
        let text = POLICY.replace("NAME", name).replace("ACTION", action);
        Object::all_of(&[(PathBuf::from("in.yaml"), text)]).unwrap()
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("mycel-dir-apply-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn apply_and_delete_keep_one_file_the_control_plane_reads_whole() {
        let d = dir("cycle");
        std::fs::write(
            d.0.join("mine.yaml"),
            POLICY.replace("NAME", "by-hand").replace("ACTION", "Deny"),
        )
        .unwrap();
        let r = apply(&d.0, &policy("a", "Deny")).unwrap();
        assert_eq!(
            r.objects,
            [("AccessPolicy shop/a".into(), Outcome::Created)]
        );
        assert_eq!(r.written, Some(d.0.join(FILE)));
        let r = apply(&d.0, &policy("a", "Deny")).unwrap();
        assert_eq!((r.objects[0].1, r.written), (Outcome::Unchanged, None));
        let r = apply(&d.0, &policy("a", "Allow")).unwrap();
        assert_eq!(r.objects[0].1, Outcome::Configured);
        apply(&d.0, &policy("b", "Deny")).unwrap();
        let config = mesh_model::load_dir(&d.0).unwrap();
        assert_eq!(config.policies.len(), 3, "by-hand, a and b");

        // What a hand-written file defines is left to it.
        let err = apply(&d.0, &policy("by-hand", "Allow"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mine.yaml") && err.contains("AccessPolicy shop/by-hand"),
            "{err}"
        );
        let key = Some(ObjectKey::new("shop", "by-hand"));
        assert!(delete(&d.0, &[("AccessPolicy", key)]).is_err());

        let r = delete(&d.0, &[("AccessPolicy", Some(ObjectKey::new("shop", "a")))]).unwrap();
        assert_eq!(r.objects[0].1, Outcome::Deleted);
        let r = delete(
            &d.0,
            &[("AccessPolicy", Some(ObjectKey::new("shop", "zz")))],
        )
        .unwrap();
        assert_eq!((r.objects[0].1, r.written), (Outcome::Absent, None));
        assert_eq!(mesh_model::load_dir(&d.0).unwrap().policies.len(), 2);
    }

    #[test]
    fn a_change_that_would_make_the_dir_invalid_writes_nothing() {
        let d = dir("invalid");
        let workload = |name: &str| {
            format!("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec: {{ node: n1, netns: /run/netns/{name}, addresses: [10.0.0.1] }}\n")
        };
        std::fs::write(d.0.join("w.yaml"), workload("one")).unwrap();
        let two = Object::all_of(&[(PathBuf::from("in.yaml"), workload("two"))]).unwrap();
        let err = apply(&d.0, &two).unwrap_err().to_string();
        assert!(
            err.contains("would be invalid") && err.contains("10.0.0.1"),
            "{err}"
        );
        assert!(!d.0.join(FILE).exists(), "nothing written");
    }
}
