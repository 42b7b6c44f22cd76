//! `mesh-node install-cni`: puts the plugin binary into the node's CNI bin dir and chains it
//! into the node's CNI configuration, after the cluster's own network plugin. The container
//! runtime then runs it for every new pod once the pod's network is set up and before its
//! containers start, which is when the node daemon must capture the pod.
//!
//! The runtime uses the first configuration file of the conf dir by name; that is the one
//! chained. A single-plugin `.conf` becomes a `.conflist` of one plugin first. Running it again
//! changes nothing; a chained entry with other settings is replaced. Every file is written
//! whole to a temporary name and renamed, so the runtime never reads half of one.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// The plugin's `type` in the configuration, and its file name in the bin dir.
pub const PLUGIN: &str = "mycel-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, io::Error),
    #[error("{0}: not a CNI configuration: {1}")]
    Bad(PathBuf, String),
    #[error("no CNI configuration (*.conflist, *.conf, *.json) in {0} yet: is the cluster's network plugin installed?")]
    NoConfig(PathBuf),
}

/// What was installed where.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    pub config: PathBuf,
    /// False when the configuration already chained the plugin as wanted.
    pub config_changed: bool,
}

/// Copies `binary` to `bin_dir/mycel-cni` and chains the plugin, told to reach the daemon on
/// `socket` and to let the pods of `exclude` start without it, into the first configuration
/// of `conf_dir`.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
    exclude: &[String],
) -> Result<Installed, InstallError> {
    let bytes = fs::read(binary).map_err(|e| InstallError::Read(binary.into(), e))?;
    let target = bin_dir.join(PLUGIN);
    write_atomic(&target, &bytes, 0o755)?;
    let entry = json!({ "type": PLUGIN, "socket": socket, "excludeNamespaces": exclude });
    let (config, config_changed) = chain(conf_dir, entry)?;
    Ok(Installed {
        binary: target,
        config,
        config_changed,
    })
}

/// The configuration file the runtime uses: the first by name.
fn primary(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let read = |e| InstallError::Read(conf_dir.into(), e);
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(read)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !name.starts_with('.')
                && ["conflist", "conf", "json"]
                    .iter()
                    .any(|ext| p.extension().is_some_and(|e| e == *ext))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(conf_dir.into()))
}

/// Adds (or updates) the plugin at the end of the primary configuration's chain. Returns the
/// file it is in and whether anything changed.
fn chain(conf_dir: &Path, entry: Value) -> Result<(PathBuf, bool), InstallError> {
    let file = primary(conf_dir)?;
    let text = fs::read_to_string(&file).map_err(|e| InstallError::Read(file.clone(), e))?;
    let bad = |why: String| InstallError::Bad(file.clone(), why);
    let mut config: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let single = config.get("plugins").is_none();
    if single {
        // One plugin: the same network as a list of one.
        if config.get("type").and_then(Value::as_str).is_none() {
            return Err(bad("neither `plugins` nor `type`".into()));
        }
        let mut plugin = config.clone();
        let map = plugin
            .as_object_mut()
            .ok_or_else(|| bad("not an object".into()))?;
        map.remove("cniVersion");
        map.remove("name");
        config = json!({
            "cniVersion": config.get("cniVersion").cloned().unwrap_or(json!("0.3.1")),
            "name": config.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
            "plugins": [plugin],
        });
    }
    let plugins = config["plugins"]
        .as_array_mut()
        .ok_or_else(|| bad("`plugins` is not a list".into()))?;
    let ours = plugins.iter().position(|p| p["type"] == PLUGIN);
    let changed = match ours {
        Some(i) if plugins[i] == entry && i + 1 == plugins.len() => false,
        Some(i) => {
            plugins.remove(i);
            plugins.push(entry);
            true
        }
        None => {
            plugins.push(entry);
            true
        }
    };
    if !changed && !single {
        return Ok((file, false));
    }
    let target = if single {
        file.with_extension("conflist")
    } else {
        file.clone()
    };
    let mut text = serde_json::to_string_pretty(&config).map_err(|e| bad(e.to_string()))?;
    text.push('\n');
    write_atomic(&target, text.as_bytes(), 0o644)?;
    if single && target != file {
        fs::remove_file(&file).map_err(|e| InstallError::Write(file.clone(), e))?;
    }
    Ok((target, true))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.mycel-tmp"));
    let err = |e| InstallError::Write(path.into(), e);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("mesh-node-cni-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(d.join("bin")).unwrap();
            fs::create_dir_all(d.join("net.d")).unwrap();
            Self(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SOCKET: &str = "/run/mycel/cni.sock";

    fn install_into(d: &Dir) -> Result<Installed, InstallError> {
        let binary = d.0.join("mesh-node");
        fs::write(&binary, b"\x7fELF plugin").unwrap();
        let exclude = ["kube-system".to_owned()];
        install(
            &binary,
            &d.0.join("bin"),
            &d.0.join("net.d"),
            Path::new(SOCKET),
            &exclude,
        )
    }

    fn read(p: &Path) -> Value {
        serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn chains_after_the_networks_plugins_once() {
        let d = Dir::new("list");
        let conf = d.0.join("net.d/10-calico.conflist");
        fs::write(
            &conf,
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        // A later file the runtime does not use stays as it is.
        fs::write(d.0.join("net.d/99-other.conf"), r#"{"type":"bridge"}"#).unwrap();
        let done = install_into(&d).unwrap();
        assert_eq!(done.config, conf);
        assert!(done.config_changed);
        let types: Vec<_> = read(&conf)["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["calico", "portmap", PLUGIN]);
        assert_eq!(read(&conf)["plugins"][2]["socket"], SOCKET);
        assert_eq!(
            read(&conf)["plugins"][2]["excludeNamespaces"],
            json!(["kube-system"])
        );
        assert_eq!(read(&conf)["cniVersion"], "1.0.0");
        let bin = d.0.join("bin").join(PLUGIN);
        assert_eq!(fs::read(&bin).unwrap(), b"\x7fELF plugin");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(read(&d.0.join("net.d/99-other.conf"))["type"], "bridge");

        // Again: nothing to change.
        let again = install_into(&d).unwrap();
        assert!(!again.config_changed);
        assert_eq!(read(&conf)["plugins"].as_array().unwrap().len(), 3);
        let leftovers: Vec<_> = fs::read_dir(d.0.join("net.d"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_and_a_stale_entry_is_replaced() {
        let d = Dir::new("single");
        let conf = d.0.join("net.d/10-flannel.conf");
        fs::write(
            &conf,
            r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#,
        )
        .unwrap();
        let done = install_into(&d).unwrap();
        assert_eq!(done.config, d.0.join("net.d/10-flannel.conflist"));
        assert!(!conf.exists(), "the .conf is replaced by the .conflist");
        let list = read(&done.config);
        assert_eq!(list["name"], "cbr0");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "flannel");
        assert_eq!(list["plugins"][0]["delegate"]["isDefaultGateway"], true);
        assert!(list["plugins"][0].get("cniVersion").is_none());
        assert_eq!(list["plugins"][1]["type"], PLUGIN);

        // An entry with another socket, not last: moved to the end with the new socket.
        let mut list = list;
        list["plugins"] = json!([{ "type": PLUGIN, "socket": "/old" }, { "type": "flannel" }]);
        fs::write(&done.config, list.to_string()).unwrap();
        let again = install_into(&d).unwrap();
        assert!(again.config_changed);
        let list = read(&again.config);
        assert_eq!(list["plugins"][0]["type"], "flannel");
        assert_eq!(list["plugins"][1]["socket"], SOCKET);
        assert_eq!(list["plugins"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn no_configuration_or_a_bad_one_is_a_clear_error() {
        let d = Dir::new("none");
        let e = install_into(&d).unwrap_err().to_string();
        assert!(e.contains("no CNI configuration"), "{e}");
        fs::write(d.0.join("net.d/10-x.conflist"), "{ not json").unwrap();
        let e = install_into(&d).unwrap_err().to_string();
        assert!(
            e.contains("10-x.conflist") && e.contains("not a CNI configuration"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}
