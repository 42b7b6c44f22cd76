//! What outlives the daemon: the capture's maps and links, pinned in bpffs under one
//! directory per node, so that a restart, an upgrade or a crash never leaves a pod uncaptured.
//!
//! ```text
//! <bpffs>/mycel/<node>/
//!   maps-v<LAYOUT_VERSION>-<digest>/<MAP>   the maps; the name says which layout they have
//!   links/<program>                         the cgroup links (connect4/6, getpeername4/6, sock_ops)
//!                                           and the sk_msg link on the hop's socket map (mycel_hop)
//!   tcx/<netns cookie>/<ifindex>-<kind>     the inbound program on each pod interface
//! ```
//!
//! bpffs takes directories and pinned objects only (no regular files) and refuses names with a
//! dot, so the layout version is part of the maps directory's name rather than a file beside
//! it, and a node's name has its dots replaced.
//!
//! While no daemon runs, the pinned programs keep redirecting enrolled pods' connects to the
//! proxy's port in the pod, where nothing listens then: they are refused, nothing leaves in
//! plaintext. The inbound program keeps dropping plaintext (STRICT) or finds no plaintext
//! listener to hand it to (PERMISSIVE) and drops it too. `mesh-node uninstall` removes it all.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC`: what `statfs` reports for a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "node name {0:?} cannot name a bpffs directory: use letters, digits, '-', '_' and '.'"
    )]
    NodeName(String),
    #[error("{0} is not a bpffs: mount the host's there (`mount -t bpf bpf {0}`; systemd does it at /sys/fs/bpf), so that the pinned capture outlives this daemon's container")]
    NotBpffs(PathBuf),
    #[error("{path} is not a bpffs and one cannot be mounted there: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// The kind of inbound program a tcx pin runs, named in its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcxKind {
    /// `mycel_inbound`: frames start with an Ethernet header.
    Ethernet,
    /// `mycel_inbound_l3`: packets start at the IP header.
    L3,
}

impl TcxKind {
    fn suffix(self) -> &'static str {
        match self {
            TcxKind::Ethernet => "eth",
            TcxKind::L3 => "l3",
        }
    }
}

/// One pinned inbound link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcxPin {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub kind: TcxKind,
    pub path: PathBuf,
}

/// A node's pin directory.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

/// What [`Pins::remove_all`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub maps: usize,
    pub links: usize,
}

/// The directory name for node `node`: its dots (which bpffs refuses) become underscores,
/// which a Kubernetes node name cannot contain, so two nodes cannot meet in one directory.
pub fn node_dir_name(node: &str) -> Result<String, PinError> {
    let valid = !node.is_empty()
        && node.len() <= 253
        && node != "."
        && node != ".."
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(PinError::NodeName(node.to_owned()));
    }
    Ok(node.replace('.', "_"))
}

/// Whether `path` is the root or a directory of a bpffs.
// The magic's C type (`__fsword_t`) is i64 here but not on every target.
#[allow(clippy::useless_conversion)]
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| i64::from(s.filesystem_type().0) == BPF_FS_MAGIC)
}

impl Pins {
    /// The pin directory of `node` under the bpffs at `bpffs`, made if missing. When `bpffs`
    /// is not one, a bpffs is mounted there if `mount` (as systemd does at /sys/fs/bpf on most
    /// hosts), else it is an error: in a container, a mount of its own would go with it.
    pub fn open(bpffs: &Path, node: &str, mount: bool) -> Result<Self, PinError> {
        let dir = bpffs.join("mycel").join(node_dir_name(node)?);
        if !is_bpffs(bpffs) {
            if !mount {
                return Err(PinError::NotBpffs(bpffs.to_path_buf()));
            }
            mount_bpffs(bpffs)?;
            tracing::info!(path = %bpffs.display(), "mounted a bpffs for the pinned capture");
        }
        for sub in [dir.join("links"), dir.join("tcx")] {
            fs::create_dir_all(&sub).map_err(|source| PinError::Create { path: sub, source })?;
        }
        Ok(Self { dir })
    }

    /// The pin directory of `node` if there is one; nothing is made or mounted.
    pub fn existing(bpffs: &Path, node: &str) -> Result<Option<Self>, PinError> {
        let dir = bpffs.join("mycel").join(node_dir_name(node)?);
        Ok((is_bpffs(bpffs) && dir.is_dir()).then_some(Self { dir }))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The directory of the maps of layout `layout` (see `layout.rs`).
    pub fn maps_dir(&self, layout: &str) -> PathBuf {
        self.dir.join(layout)
    }

    /// Maps directories of other layouts: left by an older (or newer) build.
    pub fn other_map_dirs(&self, layout: &str) -> Result<Vec<PathBuf>, PinError> {
        Ok(self
            .entries(&self.dir)?
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("maps-") && n != layout)
            })
            .collect())
    }

    /// Where the link of program `program` is pinned (a cgroup link, or `mycel_hop`'s on the
    /// socket map).
    pub fn cgroup_link(&self, program: &str) -> PathBuf {
        self.dir.join("links").join(program)
    }

    /// Where the inbound link on interface `ifindex` of the pod `netns_cookie` is pinned.
    pub fn tcx_link(&self, netns_cookie: u64, ifindex: u32, kind: TcxKind) -> PathBuf {
        self.tcx_pod(netns_cookie)
            .join(format!("{ifindex}-{}", kind.suffix()))
    }

    fn tcx_pod(&self, netns_cookie: u64) -> PathBuf {
        self.dir.join("tcx").join(netns_cookie.to_string())
    }

    /// Makes the directory of the pod's inbound links.
    pub fn create_tcx_pod(&self, netns_cookie: u64) -> Result<PathBuf, PinError> {
        let path = self.tcx_pod(netns_cookie);
        fs::create_dir_all(&path).map_err(|source| PinError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Every pinned inbound link; names this build does not write are skipped.
    pub fn tcx_links(&self) -> Result<Vec<TcxPin>, PinError> {
        let mut out = Vec::new();
        for pod in self.entries(&self.dir.join("tcx"))? {
            let Some(cookie) = file_name(&pod).and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            for link in self.entries(&pod)? {
                // A pin staged for a rename that a crash interrupted.
                if file_name(&link).is_some_and(|n| n.ends_with("_new")) {
                    let _ = fs::remove_file(&link);
                    continue;
                }
                let parsed = file_name(&link).and_then(|n| {
                    let (index, kind) = n.split_once('-')?;
                    let kind = match kind {
                        "eth" => TcxKind::Ethernet,
                        "l3" => TcxKind::L3,
                        _ => return None,
                    };
                    Some((index.parse::<u32>().ok()?, kind))
                });
                if let Some((ifindex, kind)) = parsed {
                    out.push(TcxPin {
                        netns_cookie: cookie,
                        ifindex,
                        kind,
                        path: link,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Netns cookies that have a directory of inbound links.
    pub fn tcx_pods(&self) -> Result<Vec<u64>, PinError> {
        Ok(self
            .entries(&self.dir.join("tcx"))?
            .iter()
            .filter_map(|p| file_name(p)?.parse().ok())
            .collect())
    }

    /// Unpins the pod's inbound links (detaching them, as this process holds no other
    /// reference) and removes their directory.
    pub fn remove_tcx_pod(&self, netns_cookie: u64) -> Result<usize, PinError> {
        remove_tree(&self.tcx_pod(netns_cookie))
    }

    /// The cgroup ids the pinned `PROXY_CGROUPS` maps list: those of the daemons that used
    /// these pins (the running one among them, if one runs).
    pub fn daemon_cgroups(&self) -> std::collections::HashSet<u64> {
        let mut ids = std::collections::HashSet::new();
        let dirs = self.entries(&self.dir).unwrap_or_default();
        for dir in dirs
            .iter()
            .filter(|d| file_name(d).is_some_and(|n| n.starts_with("maps-")))
        {
            let path = dir.join(mesh_ebpf_common::names::PROXY_CGROUPS);
            let Ok(data) = aya::maps::MapData::from_pin(&path) else {
                continue;
            };
            let Ok(map) = aya::maps::Map::from_map_data(data) else {
                continue;
            };
            if let Ok(map) = aya::maps::HashMap::<_, u64, u32>::try_from(map) {
                ids.extend(map.keys().filter_map(Result::ok));
            }
        }
        ids
    }

    /// Unpins the maps of another layout, once nothing runs with them.
    pub fn remove_maps(&self, dir: &Path) -> Result<usize, PinError> {
        remove_tree(dir)
    }

    /// Unpins everything of this node: the programs detach as their last reference goes.
    pub fn remove_all(self) -> Result<Removed, PinError> {
        let mut removed = Removed::default();
        for entry in self.entries(&self.dir)? {
            let n = remove_tree(&entry)?;
            if file_name(&entry).is_some_and(|n| n.starts_with("maps-")) {
                removed.maps += n;
            } else {
                removed.links += n;
            }
        }
        fs::remove_dir(&self.dir).map_err(|source| PinError::Remove {
            path: self.dir.clone(),
            source,
        })?;
        // The parent goes too when this was the last node pinned on the host.
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(removed)
    }

    fn entries(&self, dir: &Path) -> Result<Vec<PathBuf>, PinError> {
        entries(dir)
    }
}

fn file_name(p: &Path) -> Option<&str> {
    p.file_name()?.to_str()
}

/// The entries of `dir`, sorted; none when it does not exist.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PinError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    out.sort();
    Ok(out)
}

/// Removes `path` and what is below it; how many pinned objects went.
fn remove_tree(path: &Path) -> Result<usize, PinError> {
    let remove_err = |source| PinError::Remove {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(remove_err(source)),
    };
    if !meta.is_dir() {
        return match fs::remove_file(path) {
            Ok(()) => Ok(1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(remove_err(source)),
        };
    }
    let mut n = 0;
    for entry in entries(path)? {
        n += remove_tree(&entry)?;
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(n),
        Err(source) => Err(remove_err(source)),
    }
}

fn mount_bpffs(path: &Path) -> Result<(), PinError> {
    let mount_err = |source| PinError::Mount {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(path).map_err(mount_err)?;
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| mount_err(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_become_directory_names() {
        assert_eq!(node_dir_name("node-1").unwrap(), "node-1");
        assert_eq!(
            node_dir_name("ip-10-0-1-2.ec2.internal").unwrap(),
            "ip-10-0-1-2_ec2_internal"
        );
        for bad in ["", ".", "..", "a/b", "a b", "nul\0", "é"] {
            assert!(node_dir_name(bad).is_err(), "{bad:?}");
        }
        assert!(node_dir_name(&"a".repeat(254)).is_err());
    }

    /// A bpffs of the test's own, unmounted on drop (pins in it go with it).
    struct Bpffs(PathBuf);

    impl Bpffs {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("mycel-test-pins-{name}-{}", std::process::id()));
            mount_bpffs(&dir).expect("mount a bpffs");
            Self(dir)
        }
    }

    impl Drop for Bpffs {
        fn drop(&mut self) {
            let _ = nix::mount::umount(&self.0);
            let _ = fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn layout_of_a_node_directory_round_trips() {
        let fs = Bpffs::new("layout");
        assert!(is_bpffs(&fs.0));
        assert!(Pins::existing(&fs.0, "n.1").unwrap().is_none());
        let plain =
            std::env::temp_dir().join(format!("mycel-test-pins-plain-{}", std::process::id()));
        fs::create_dir_all(&plain).unwrap();
        let refused = Pins::open(&plain, "n1", false).unwrap_err().to_string();
        fs::remove_dir(&plain).unwrap();
        assert!(refused.contains("is not a bpffs"), "{refused}");
        let pins = Pins::open(&fs.0, "n.1", false).unwrap();
        assert!(pins.path().ends_with("mycel/n_1"));
        let pod = pins.create_tcx_pod(77).unwrap();
        // Directories stand in for the pinned links: only the names are read here.
        fs::create_dir(pod.join("5-eth")).unwrap();
        fs::create_dir(pod.join("6-l3")).unwrap();
        fs::create_dir(pod.join("junk")).unwrap();
        fs::create_dir(pins.maps_dir("maps-v1-aa")).unwrap();
        fs::create_dir(pins.maps_dir("maps-v0-bb")).unwrap();
        let links = pins.tcx_links().unwrap();
        assert_eq!(
            links
                .iter()
                .map(|l| (l.netns_cookie, l.ifindex, l.kind))
                .collect::<Vec<_>>(),
            [(77, 5, TcxKind::Ethernet), (77, 6, TcxKind::L3)]
        );
        assert_eq!(pins.tcx_pods().unwrap(), [77]);
        assert_eq!(
            pins.other_map_dirs("maps-v1-aa").unwrap(),
            [pins.maps_dir("maps-v0-bb")]
        );
        assert!(Pins::existing(&fs.0, "n.1").unwrap().is_some());
        pins.remove_all().unwrap();
        assert!(!fs.0.join("mycel").exists());
    }
}
