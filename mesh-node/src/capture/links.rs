//! The capture's links, pinned: made once, then handed from daemon to daemon by swapping the
//! program they run in place (`BPF_LINK_UPDATE`), so that no connect and no packet ever meets
//! the hook empty. A link is made afresh only when there is none to take over, or the one
//! pinned is defunct (its cgroup or interface went) or hooks another cgroup.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use super::{
    pins::{PinError, Pins, TcxKind},
    sys::{self, ATTACH_SK_MSG_VERDICT, LINK_TYPE_CGROUP, LINK_TYPE_SOCKMAP, LINK_TYPE_TCX},
};

/// `BPF_TCX_INGRESS` in the kernel's attach types.
pub const TCX_INGRESS: u32 = 46;

/// How a cgroup link came to run this daemon's program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The pinned link now runs it: it was never detached.
    Updated,
    /// There was no link; one was made and pinned.
    Attached,
    /// The pinned link was defunct or hooked another cgroup; a new one replaced it.
    Replaced,
}

/// Makes the link pinned for `program` run `prog` on `cgroup` (id `cgroup_id`, attach type
/// `attach_type`).
pub fn take_cgroup_link(
    pins: &Pins,
    program: &str,
    prog: BorrowedFd<'_>,
    cgroup: &fs::File,
    cgroup_id: u64,
    attach_type: u32,
) -> io::Result<Taken> {
    let hook = Hook {
        link_type: LINK_TYPE_CGROUP,
        target: cgroup.as_fd(),
        target_id: cgroup_id,
        attach_type,
    };
    take_link(pins, program, prog, hook)
}

/// Makes the link pinned for `program` run `prog` (an `sk_msg` program) on the socket map
/// `map` (id `map_id`). A map of another layout's gets a new link; the old map keeps its
/// sockets, which keep the program they joined with, until they close.
pub fn take_sockmap_link(
    pins: &Pins,
    program: &str,
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    map_id: u32,
) -> io::Result<Taken> {
    let hook = Hook {
        link_type: LINK_TYPE_SOCKMAP,
        target: map,
        target_id: u64::from(map_id),
        attach_type: ATTACH_SK_MSG_VERDICT,
    };
    take_link(pins, program, prog, hook)
}

/// Where a pinned link hooks: its kind, the object it is attached to and how.
struct Hook<'a> {
    link_type: u32,
    target: BorrowedFd<'a>,
    target_id: u64,
    attach_type: u32,
}

fn take_link(
    pins: &Pins,
    program: &str,
    prog: BorrowedFd<'_>,
    hook: Hook<'_>,
) -> io::Result<Taken> {
    let path = pins.cgroup_link(program);
    let mut taken = Taken::Attached;
    match sys::obj_get(&path) {
        Ok(link) => {
            let same_hook = sys::link_info(link.as_fd()).is_ok_and(|i| {
                i.link_type == hook.link_type
                    && i.target == hook.target_id
                    && i.attach_type == hook.attach_type
            });
            if same_hook {
                match sys::link_update(link.as_fd(), prog) {
                    Ok(()) => return Ok(Taken::Updated),
                    Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
                    Err(e) => return Err(e),
                }
            }
            taken = Taken::Replaced;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let link = sys::link_create(prog, hook.target.as_raw_fd() as u32, hook.attach_type)?;
    pin_replacing(link.as_fd(), &path)?;
    Ok(taken)
}

/// Attaches `prog` at tcx ingress of interface `ifindex` of the calling thread's netns and
/// pins the link, replacing a pin left for an earlier interface with the same index.
pub fn attach_inbound(
    pins: &Pins,
    netns_cookie: u64,
    ifindex: u32,
    kind: TcxKind,
    prog: BorrowedFd<'_>,
) -> io::Result<()> {
    pins.create_tcx_pod(netns_cookie)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let link = sys::link_create(prog, ifindex, TCX_INGRESS)?;
    // Another kind's pin for the same index is of a device that is gone.
    let other = match kind {
        TcxKind::Ethernet => TcxKind::L3,
        TcxKind::L3 => TcxKind::Ethernet,
    };
    let _ = fs::remove_file(pins.tcx_link(netns_cookie, ifindex, other));
    pin_replacing(link.as_fd(), &pins.tcx_link(netns_cookie, ifindex, kind))
}

/// What [`take_inbound_links`] found.
#[derive(Debug, Default)]
pub struct Inbound {
    /// Links that now run this daemon's programs.
    pub updated: usize,
    /// Pins of interfaces that are gone, removed.
    pub removed: usize,
    /// Pods (netns cookies) none of whose interfaces is left: their netns is gone.
    pub pods_gone: Vec<u64>,
}

/// Makes every pinned inbound link run this daemon's program of its kind; unpins those of
/// interfaces that are gone.
pub fn take_inbound_links(
    pins: &Pins,
    ethernet: BorrowedFd<'_>,
    l3: BorrowedFd<'_>,
) -> Result<Inbound, PinError> {
    let mut out = Inbound::default();
    let mut live: BTreeMap<u64, usize> = BTreeMap::new();
    for pod in pins.tcx_pods()? {
        live.insert(pod, 0);
    }
    for pin in pins.tcx_links()? {
        let prog = match pin.kind {
            TcxKind::Ethernet => ethernet,
            TcxKind::L3 => l3,
        };
        let taken = sys::obj_get(&pin.path).and_then(|link| {
            let info = sys::link_info(link.as_fd())?;
            if info.link_type != LINK_TYPE_TCX || info.target == 0 {
                return Ok(false);
            }
            match sys::link_update(link.as_fd(), prog) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(false),
                Err(e) => Err(e),
            }
        });
        match taken {
            Ok(true) => {
                out.updated += 1;
                *live.entry(pin.netns_cookie).or_default() += 1;
            }
            Ok(false) => {
                let _ = fs::remove_file(&pin.path);
                out.removed += 1;
            }
            Err(e) => {
                // Still attached, running the previous daemon's program, which polices as
                // before: keep it rather than leave the interface open.
                tracing::warn!(path = %pin.path.display(), error = %e, "cannot take over an inbound link; it keeps running the previous program");
                *live.entry(pin.netns_cookie).or_default() += 1;
            }
        }
    }
    for (pod, links) in live {
        if links == 0 {
            pins.remove_tcx_pod(pod)?;
            out.pods_gone.push(pod);
        }
    }
    Ok(out)
}

/// Unpins the inbound links of the pod `netns_cookie` on interfaces not in `present`.
pub fn forget_inbound(pins: &Pins, netns_cookie: u64, present: &HashSet<u32>) -> usize {
    let Ok(links) = pins.tcx_links() else {
        return 0;
    };
    links
        .iter()
        .filter(|l| l.netns_cookie == netns_cookie && !present.contains(&l.ifindex))
        .filter(|l| fs::remove_file(&l.path).is_ok())
        .count()
}

/// Pins `link` at `path`, replacing what is pinned there in one rename: the old link loses
/// its last reference (and detaches) only once the new one holds the path.
fn pin_replacing(link: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pin path has no name"))?;
    let staged = path.with_file_name(format!("{name}_new"));
    match fs::remove_file(&staged) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    sys::obj_pin(link, &staged)?;
    fs::rename(&staged, path).inspect_err(|_| {
        let _ = fs::remove_file(&staged);
    })
}
