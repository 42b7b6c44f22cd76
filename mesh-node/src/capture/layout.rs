//! Which pinned maps a daemon may adopt: the layout of the maps this build's object declares,
//! named so that two builds (or two `--orig-dst-capacity` settings) with different maps never
//! share a directory.
//!
//! The name is `maps-v<LAYOUT_VERSION>-<digest>`: the version says what the keys and values
//! mean (bumped by hand when that changes), the digest covers what the kernel can check (type,
//! key and value size, capacity, flags) of every pinned map, so a change there needs no bump to
//! be noticed. Maps found under this build's name are checked once more before they are used.

use std::{os::fd::AsFd as _, path::Path};

use mesh_ebpf_common::{names, LAYOUT_VERSION};

use super::sys::{self, MapInfo};

/// The maps pinned for a node; the others (the programs' read-only data, the log buffer) are
/// per program instance.
pub const PINNED: [&str; 11] = [
    names::ENROLLED,
    names::ORIG_BY_COOKIE,
    names::ORIG_BY_TUPLE,
    names::FAST_DENY,
    names::OPEN_PORTS,
    names::INBOUND_MODE,
    names::PROXY_CGROUPS,
    names::COUNTERS,
    names::HOP_SOCKS,
    names::HOP_STATE,
    names::LOCAL_HOP,
];

/// Maps that start empty under a new layout: the old layout's hop sockets stay in its own
/// socket map, with its program and its state map, until they close; and the switch is set
/// by the daemon's config.
const NOT_CARRIED: [&str; 3] = [names::HOP_SOCKS, names::HOP_STATE, names::LOCAL_HOP];

/// Capacity of the local hop's maps: each connection from a pod has two hop sockets on its
/// source side, and one delivered into a pod two more.
pub fn hop_capacity(orig_dst_capacity: u32) -> u32 {
    orig_dst_capacity.saturating_mul(2)
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot parse the embedded eBPF object: {0}")]
    Parse(String),
    #[error("the embedded eBPF object has no map {0}")]
    Missing(&'static str),
    #[error("pinned map {path} is not what this build expects ({found:?}, expected {expected:?}); stop mesh-node on this node and run `mesh-node uninstall`")]
    Mismatch {
        path: String,
        found: MapInfo,
        expected: MapInfo,
    },
    #[error("cannot read pinned map {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// The pinned maps as this build declares them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The maps directory's name.
    pub name: String,
    pub maps: Vec<(&'static str, MapInfo)>,
}

impl Layout {
    /// The layout of `object` with the original-destination maps sized `orig_dst_capacity`.
    pub fn of(object: &[u8], orig_dst_capacity: u32) -> Result<Self, LayoutError> {
        let parsed =
            aya_obj::Object::parse(object).map_err(|e| LayoutError::Parse(e.to_string()))?;
        let mut maps = Vec::new();
        for name in PINNED {
            let map = parsed.maps.get(name).ok_or(LayoutError::Missing(name))?;
            let max_entries = match name {
                names::ORIG_BY_COOKIE | names::ORIG_BY_TUPLE => orig_dst_capacity,
                names::HOP_SOCKS | names::HOP_STATE => hop_capacity(orig_dst_capacity),
                _ => map.max_entries(),
            };
            maps.push((
                name,
                MapInfo {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                    flags: map.map_flags(),
                },
            ));
        }
        let mut digest = Fnv::default();
        for (name, info) in &maps {
            digest.write(name.as_bytes());
            for v in [
                info.map_type,
                info.key_size,
                info.value_size,
                info.max_entries,
                info.flags,
            ] {
                digest.write(&v.to_le_bytes());
            }
        }
        Ok(Self {
            name: format!("maps-v{LAYOUT_VERSION}-{:016x}", digest.0),
            maps,
        })
    }

    /// Checks every map pinned in `dir` against this layout; a map not pinned yet is fine
    /// (the loader makes it).
    pub fn check(&self, dir: &Path) -> Result<(), LayoutError> {
        for (name, expected) in &self.maps {
            let path = dir.join(name);
            let fd = match sys::obj_get(&path) {
                Ok(fd) => fd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(LayoutError::Read {
                        path: path.display().to_string(),
                        source,
                    })
                }
            };
            let found = sys::map_info(fd.as_fd()).map_err(|source| LayoutError::Read {
                path: path.display().to_string(),
                source,
            })?;
            if found != *expected {
                return Err(LayoutError::Mismatch {
                    path: path.display().to_string(),
                    found,
                    expected: *expected,
                });
            }
        }
        Ok(())
    }
}

impl Layout {
    /// Copies into the maps in `to` (this layout's) what the maps of an older layout in `from`
    /// hold, for each map whose kind and key and value sizes did not change: the enrolled pods,
    /// the mode, the open ports, the records of open connections. What cannot be carried
    /// over starts empty and is filled again as the daemon applies its config. Returns the
    /// maps carried over with their entry counts.
    pub fn carry_over(&self, from: &Path, to: &Path) -> Vec<(&'static str, u32)> {
        let mut carried = Vec::new();
        // Another version may mean other things by the same bytes (a mode renumbered, say):
        // only an explicit conversion could carry its maps over, and there is none yet.
        let same_version = from
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("maps-v{LAYOUT_VERSION}-")));
        if !same_version {
            tracing::warn!(from = %from.display(), "maps of another layout version; they are not carried over, and the pods are enrolled again as the config is applied");
            return carried;
        }
        for (name, expected) in self.maps.iter().filter(|(n, _)| !NOT_CARRIED.contains(n)) {
            let (Ok(old), Ok(new)) = (sys::obj_get(&from.join(name)), sys::obj_get(&to.join(name)))
            else {
                continue;
            };
            let Ok(info) = sys::map_info(old.as_fd()) else {
                continue;
            };
            let same = info.map_type == expected.map_type
                && info.key_size == expected.key_size
                && info.value_size == expected.value_size;
            if !same || !sys::COPYABLE_MAP_TYPES.contains(&info.map_type) {
                tracing::warn!(map = name, from = %from.display(), "the map's layout changed; it starts empty");
                continue;
            }
            match sys::copy_entries(
                old.as_fd(),
                new.as_fd(),
                info.key_size as usize,
                info.value_size as usize,
                info.max_entries.min(expected.max_entries),
            ) {
                Ok(n) => carried.push((*name, n)),
                Err(e) => {
                    tracing::warn!(map = name, error = %e, "cannot carry the map's entries over")
                }
            }
        }
        carried
    }
}

/// FNV-1a, 64 bits: a stable digest (std's hasher may change between releases, and the name
/// must not).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_follows_the_maps_and_nothing_else() {
        let a = Layout::of(super::super::OBJECT, 1024).unwrap();
        let again = Layout::of(super::super::OBJECT, 1024).unwrap();
        let b = Layout::of(super::super::OBJECT, 2048).unwrap();
        assert_eq!(a.name, again.name);
        assert_ne!(a.name, b.name, "a capacity change is a layout change");
        assert!(a.name.starts_with(&format!("maps-v{LAYOUT_VERSION}-")));
        assert!(!a.name.contains('.'), "bpffs refuses dots");
        assert_eq!(a.maps.len(), PINNED.len());
        let enrolled = a.maps.iter().find(|(n, _)| *n == names::ENROLLED).unwrap();
        assert_eq!(enrolled.1.key_size, 8);
        assert_eq!(enrolled.1.max_entries, mesh_ebpf_common::ENROLLED_CAPACITY);
    }
}
