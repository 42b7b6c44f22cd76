//! The pod-local hop through the socket map (`localHop: sockmap`, experimental): the `sk_msg`
//! program's pinned link on `HOP_SOCKS`, the `LOCAL_HOP` switch, and `sock_ops` on the
//! daemon's own cgroup.
//!
//! The proxy's hop sockets (its accepted sockets on the outbound port, its delivery sockets
//! toward applications) are made by the daemon, so `sock_ops` must run in the daemon's cgroup
//! to put them into the map as they are established, before the application's first send.
//! Where that cgroup lies below the captured one, the captured cgroup's link does it; where it
//! lies apart, a link of this process does (attached when the hop is first turned on, gone
//! with the process). A daemon whose cgroup contains the captured one cannot have it: the
//! program would run twice for every pod socket, and for every other socket below.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, MapData},
    programs::SkMsg,
    Ebpf,
};
use mesh_ebpf_common::{names, LOCAL_HOP_SOCKMAP};

use super::{links, pins::Pins, program_fd, sys};

/// Why the socket-map hop cannot be used on this node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HopError {
    #[error("the kernel refused the sk_msg program: {0}")]
    Load(String),
    #[error(
        "cannot attach the sk_msg program to the socket map (sockmap links need Linux 6.10): {0}"
    )]
    Link(String),
    #[error("cannot read the daemon's cgroup {path}: {reason}")]
    OwnCgroup { path: PathBuf, reason: String },
    #[error("the daemon's cgroup {own} contains the captured cgroup {captured}: run mesh-node in a cgroup of its own")]
    DaemonAbove { own: PathBuf, captured: PathBuf },
    #[error("cannot attach sock_ops to the daemon's cgroup {path}: {reason}")]
    OwnLink { path: PathBuf, reason: String },
    #[error("cannot write the LOCAL_HOP map: {0}")]
    Map(String),
}

impl HopError {
    /// Whether this node cannot have the hop at all (trying again would not help), rather
    /// than one attempt to turn it on having failed.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, HopError::OwnLink { .. } | HopError::Map(_))
    }
}

/// Where the daemon's cgroup lies relative to the captured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The captured cgroup or below it: its link runs for the daemon's sockets.
    Within,
    /// An ancestor of the captured cgroup.
    Above,
    /// Neither.
    Apart,
}

/// The daemon's cgroup, to attach `sock_ops` to when the hop is first turned on.
struct OwnCgroup {
    dir: PathBuf,
    sock_ops: OwnedFd,
    link: Option<OwnedFd>,
}

/// The hop's switch and what it needs; one per daemon, in [`super::Capture`].
pub struct LocalHop {
    mode: Mutex<Array<MapData, u32>>,
    /// `Err` when the hop is unavailable on this node, with why.
    available: Result<(), HopError>,
    /// `None` when the captured cgroup's link covers the daemon's sockets.
    own: Mutex<Option<OwnCgroup>>,
}

impl LocalHop {
    /// The hop as this start finds it: `link` is what taking the `sk_msg` link gave
    /// ([`take_link`]). `LOCAL_HOP` is written off here: the pinned value is the previous
    /// daemon's, and only this daemon's config may turn the hop on.
    pub fn new(
        mode: Array<MapData, u32>,
        link: Result<(), HopError>,
        ebpf: &Ebpf,
        own_cgroup: Option<&Path>,
        captured: &Path,
    ) -> Self {
        let mut hop = Self {
            mode: Mutex::new(mode),
            available: link,
            own: Mutex::new(None),
        };
        if hop.available.is_ok() {
            if let Some(own) = own_cgroup {
                match own_cgroup_link(ebpf, own, captured) {
                    Ok(own) => hop.own = Mutex::new(own),
                    Err(e) => hop.available = Err(e),
                }
            }
        }
        if let Err(e) = &hop.available {
            tracing::info!(reason = %e, "localHop: sockmap is unavailable on this node; the pod-local hop stays on loopback TCP");
        }
        if let Err(e) = hop.write(0) {
            tracing::warn!(error = %e, "cannot reset the local hop switch");
        }
        hop
    }

    /// Whether new hop sockets join the socket map. Connections already on a path keep it.
    /// Turning it on where it is unavailable leaves it off and says why.
    pub fn set(&self, sockmap: bool) -> Result<(), HopError> {
        if !sockmap {
            return self.write(0);
        }
        if let Err(e) = &self.available {
            self.write(0)?;
            return Err(e.clone());
        }
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(own) = own.as_mut().filter(|o| o.link.is_none()) {
            let dir = File::open(&own.dir).map_err(|e| HopError::OwnLink {
                path: own.dir.clone(),
                reason: e.to_string(),
            })?;
            let link = sys::link_create(
                own.sock_ops.as_fd(),
                dir.as_raw_fd() as u32,
                sys::ATTACH_CGROUP_SOCK_OPS,
            )
            .map_err(|e| HopError::OwnLink {
                path: own.dir.clone(),
                reason: e.to_string(),
            })?;
            own.link = Some(link);
        }
        self.write(LOCAL_HOP_SOCKMAP)
    }

    fn write(&self, value: u32) -> Result<(), HopError> {
        self.mode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(0, value, 0)
            .map_err(|e| HopError::Map(e.to_string()))
    }
}

/// Loads `mycel_hop` and makes the pinned link on `HOP_SOCKS` run it. Before the cgroup links
/// run this build's `sock_ops`: a socket takes its send hook from the map when it joins.
pub fn take_link(ebpf: &mut Ebpf, pins: &Pins) -> Result<(), HopError> {
    let missing = |what: &str| HopError::Load(format!("the eBPF object has no {what}"));
    let prog: &mut SkMsg = ebpf
        .program_mut(names::HOP)
        .ok_or_else(|| missing(names::HOP))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| HopError::Load(e.to_string()))?;
    // Loaded here rather than with the others: a kernel that refuses it still captures.
    prog.load().map_err(|e| HopError::Load(e.to_string()))?;
    let prog = ebpf
        .program(names::HOP)
        .ok_or_else(|| missing(names::HOP))?;
    let prog = program_fd(prog, names::HOP).map_err(|e| HopError::Load(e.to_string()))?;
    let Some(aya::maps::Map::SockHash(map)) = ebpf.map(names::HOP_SOCKS) else {
        return Err(missing(names::HOP_SOCKS));
    };
    let map = map.fd().as_fd();
    let id = sys::map_id(map).map_err(|e| HopError::Link(e.to_string()))?;
    links::take_sockmap_link(pins, names::HOP, prog.as_fd(), map, id)
        .map(drop)
        .map_err(|e| HopError::Link(e.to_string()))
}

/// What the daemon's own cgroup needs: nothing when the captured cgroup's link covers it,
/// else `sock_ops` to attach there.
fn own_cgroup_link(
    ebpf: &Ebpf,
    own: &Path,
    captured: &Path,
) -> Result<Option<OwnCgroup>, HopError> {
    let unreadable = |e: io::Error| HopError::OwnCgroup {
        path: own.to_path_buf(),
        reason: e.to_string(),
    };
    match place(own, captured).map_err(unreadable)? {
        Place::Within => Ok(None),
        Place::Above => Err(HopError::DaemonAbove {
            own: own.to_path_buf(),
            captured: captured.to_path_buf(),
        }),
        Place::Apart => {
            let prog = ebpf.program(names::SOCK_OPS).ok_or_else(|| {
                HopError::Load(format!("the eBPF object has no {}", names::SOCK_OPS))
            })?;
            let sock_ops =
                program_fd(prog, names::SOCK_OPS).map_err(|e| HopError::Load(e.to_string()))?;
            Ok(Some(OwnCgroup {
                dir: own.to_path_buf(),
                sock_ops,
                link: None,
            }))
        }
    }
}

/// Where `own` lies relative to `captured`, by walking each one's parents up to the top of
/// its mount. Two mounts of one hierarchy (a container's view and the host's) see the same
/// inodes; a relation above what a mount shows is not seen, and taken for `Apart`.
fn place(own: &Path, captured: &Path) -> io::Result<Place> {
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let (own_id, captured_id) = (id(own)?, id(captured)?);
    let reaches = |from: &Path, target: (u64, u64)| {
        let mut at = Some(from);
        while let Some(dir) = at {
            match id(dir) {
                Ok(found) if found == target => return true,
                Ok(found) if found.0 != target.0 => return false,
                Ok(_) => at = dir.parent(),
                Err(_) => return false,
            }
        }
        false
    };
    Ok(if reaches(own, captured_id) {
        Place::Within
    } else if reaches(captured, own_id) {
        Place::Above
    } else {
        Place::Apart
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_cgroup_is_placed_by_its_parents() {
        let root = std::env::temp_dir().join(format!("mesh-node-hop-{}", std::process::id()));
        let captured = root.join("pods");
        let below = captured.join("daemon");
        let apart = root.join("daemon");
        for d in [&below, &apart] {
            std::fs::create_dir_all(d).unwrap();
        }
        let found = [
            place(&captured, &captured),
            place(&below, &captured),
            place(&root, &captured),
            place(&apart, &captured),
        ];
        std::fs::remove_dir_all(&root).unwrap();
        let found: Vec<Place> = found.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            found,
            [Place::Within, Place::Within, Place::Above, Place::Apart]
        );
    }
}
