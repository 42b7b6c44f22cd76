//! One mesh-node per cgroup, and no Mycel attachments but those of its pins.
//!
//! The daemon's links are pinned and taken over by the next daemon (`links.rs`). What else can
//! be found on a cgroup is an attachment made some other way (a legacy `BPF_PROG_ATTACH`, a
//! link pinned in another bpffs or by hand); those are removed once the daemon's own links are
//! in place. A second live daemon on the same cgroup is refused, because both would redirect
//! the same connects.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use mesh_ebpf_common::names;

use super::sys::Attr;

const LOCK_DIR: &str = "/run/mycel";

const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The attach types mesh-node uses, with the kernel's numbering.
const ATTACH_TYPES: [(u32, &str); 5] = [
    (3, "sock_ops"),
    (10, "connect4"),
    (11, "connect6"),
    (29, "getpeername4"),
    (30, "getpeername6"),
];

const OUR_PROGRAMS: [&str; 5] = [
    names::CONNECT4,
    names::CONNECT6,
    names::GETPEERNAME4,
    names::GETPEERNAME6,
    names::SOCK_OPS,
];

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("another mesh-node already owns cgroup {cgroup} (lock {lock} is held); stop it first")]
    Busy { cgroup: PathBuf, lock: PathBuf },
    #[error("cannot take lock {lock}: {source}")]
    Lock { lock: PathBuf, source: io::Error },
    #[error("cannot query programs attached to {cgroup}: {source}")]
    Query { cgroup: PathBuf, source: io::Error },
    #[error("cannot remove stale program {name} (id {id}) from {cgroup}: {source}")]
    Detach {
        cgroup: PathBuf,
        name: String,
        id: u32,
        source: io::Error,
    },
}

/// Held for the daemon's lifetime. On drop the lock file is removed while still locked; a
/// crash leaves the file, and the kernel releases the flock with the process. Handed over
/// (its open file passed to the next daemon, which then holds the flock), it is left alone.
pub struct CgroupLock {
    path: PathBuf,
    file: File,
    handed_over: std::sync::atomic::AtomicBool,
}

impl Drop for CgroupLock {
    fn drop(&mut self) {
        // The handoff socket beside the lock is the lock holder's too: only the daemon that
        // owns the cgroup listens there.
        if !self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            let _ = fs::remove_file(self.path.with_extension("handoff"));
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl CgroupLock {
    /// The open lock file, to hand over.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the lock file is another daemon's to remove: this one handed the lock over
    /// (or offered it), or has not finished taking it over.
    pub fn set_handed_over(&self, handed: bool) {
        self.handed_over
            .store(handed, std::sync::atomic::Ordering::Release);
    }

    /// The lock an earlier daemon handed over, if `file` is the lock file of `cgroup_dir`
    /// and holds its `flock`. Until the takeover completes ([`CgroupLock::set_handed_over`]
    /// with `false`), the file stays the old daemon's to remove.
    pub fn adopt(cgroup: &Path, cgroup_dir: &File, file: File) -> Result<Self, AttachError> {
        let path = lock_path(cgroup, cgroup_dir)?;
        let lock_err = |source| AttachError::Lock {
            lock: path.clone(),
            source,
        };
        let handed = file.metadata().map_err(lock_err)?;
        let current = fs::metadata(&path).map_err(lock_err)?;
        if (handed.dev(), handed.ino()) != (current.dev(), current.ino()) {
            return Err(lock_err(io::Error::other(
                "the lock file handed over is not this cgroup's",
            )));
        }
        // The same open file as the old daemon's holds its lock, so this succeeds; another
        // open of the same file would not.
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(lock_err(io::Error::other(
                "the lock file handed over does not hold the lock",
            )));
        }
        Ok(Self {
            path,
            file,
            handed_over: std::sync::atomic::AtomicBool::new(true),
        })
    }
}

/// Where the daemon that owns `cgroup` keeps its lock: named by the cgroup directory's device
/// and inode, so that two paths to one cgroup meet.
pub fn lock_path(cgroup: &Path, cgroup_dir: &File) -> Result<PathBuf, AttachError> {
    let meta = cgroup_dir.metadata().map_err(|source| AttachError::Lock {
        lock: cgroup.to_path_buf(),
        source,
    })?;
    Ok(PathBuf::from(LOCK_DIR).join(format!("cgroup-{}-{}.lock", meta.dev(), meta.ino())))
}

/// Where the daemon that owns `cgroup` answers a new one that wants to take over.
pub fn handoff_path(cgroup: &Path, cgroup_dir: &File) -> Result<PathBuf, AttachError> {
    Ok(lock_path(cgroup, cgroup_dir)?.with_extension("handoff"))
}

/// Takes ownership of `cgroup` for this process.
pub fn claim(cgroup: &Path, cgroup_dir: &File) -> Result<CgroupLock, AttachError> {
    let lock = lock_path(cgroup, cgroup_dir)?;
    let lock_err = |source| AttachError::Lock {
        lock: lock.clone(),
        source,
    };
    fs::create_dir_all(LOCK_DIR).map_err(lock_err)?;
    let file = loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(lock_err)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(AttachError::Busy {
                    cgroup: cgroup.to_path_buf(),
                    lock,
                });
            }
            return Err(lock_err(e));
        }
        // The previous owner may have unlinked the file between our open and our flock; a lock
        // on an unlinked file protects nothing, so start over with the current one.
        let locked = file.metadata().map_err(lock_err)?.ino();
        match fs::metadata(&lock) {
            Ok(current) if current.ino() == locked => break file,
            _ => continue,
        }
    };
    Ok(CgroupLock {
        path: lock,
        file,
        handed_over: Default::default(),
    })
}

/// Detaches from `cgroup` every Mycel program but those with an id in `keep`.
pub fn remove_stale(cgroup: &Path, cgroup_dir: &File, keep: &[u32]) -> Result<(), AttachError> {
    for (attach_type, type_name) in ATTACH_TYPES {
        let ids = query(cgroup_dir, attach_type).map_err(|source| AttachError::Query {
            cgroup: cgroup.to_path_buf(),
            source,
        })?;
        for id in ids {
            if keep.contains(&id) {
                continue;
            }
            let Some(info) = program_info(id) else {
                continue;
            };
            let Some(name) = info.name_as_str().map(str::to_owned) else {
                continue;
            };
            if !OUR_PROGRAMS.contains(&name.as_str()) {
                continue;
            }
            tracing::warn!(
                cgroup = %cgroup.display(), program = %name, id, attach = type_name,
                "removing a stale Mycel attachment left by an earlier run"
            );
            match detach(cgroup_dir, attach_type, id, &info) {
                Ok(()) => {}
                // Gone meanwhile: an unpinned link is released a moment after its last
                // reference goes.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(AttachError::Detach {
                        cgroup: cgroup.to_path_buf(),
                        name,
                        id,
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Whether a Mycel program is attached to `cgroup` itself.
pub fn any_attached(cgroup_dir: &File) -> io::Result<bool> {
    for (attach_type, _) in ATTACH_TYPES {
        for id in query(cgroup_dir, attach_type)? {
            let ours = program_info(id)
                .and_then(|i| i.name_as_str().map(|n| OUR_PROGRAMS.contains(&n)))
                .unwrap_or(false);
            if ours {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn program_info(id: u32) -> Option<aya::programs::ProgramInfo> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
}

/// `BPF_TCX_INGRESS` in the kernel's attach types.
const BPF_TCX_INGRESS: u32 = 46;

/// Ids of the programs running at tcx ingress of interface `ifindex` of the calling thread's
/// netns.
pub fn tcx_ingress_programs(ifindex: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::default();
    attr.put_u32(0, ifindex);
    attr.put_u32(4, BPF_TCX_INGRESS);
    attr.put_u64(16, ids.as_mut_ptr() as u64);
    attr.put_u32(24, ids.len() as u32);
    attr.sys(BPF_PROG_QUERY)?;
    ids.truncate(attr.get_u32(24) as usize);
    Ok(ids)
}

/// Programs attached to the cgroup itself (not inherited) for one attach type.
fn query(cgroup_dir: &File, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::default();
    attr.put_u32(0, cgroup_dir.as_raw_fd() as u32);
    attr.put_u32(4, attach_type);
    attr.put_u64(16, ids.as_mut_ptr() as u64);
    attr.put_u32(24, ids.len() as u32);
    attr.sys(BPF_PROG_QUERY)?;
    ids.truncate(attr.get_u32(24) as usize);
    Ok(ids)
}

fn detach(
    cgroup_dir: &File,
    attach_type: u32,
    prog_id: u32,
    info: &aya::programs::ProgramInfo,
) -> io::Result<()> {
    // A link (pinned somewhere) keeps the program attached: detach the link itself.
    let link = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .find(|l| l.program_id() == prog_id);
    if let Some(link) = link {
        let mut attr = Attr::default();
        attr.put_u32(0, link.id());
        let fd = attr.sys(BPF_LINK_GET_FD_BY_ID)?;
        // SAFETY: the syscall returned a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut attr = Attr::default();
        attr.put_u32(0, fd.as_raw_fd() as u32);
        attr.sys(BPF_LINK_DETACH)?;
        return Ok(());
    }
    let prog_fd = match info.fd() {
        Ok(fd) => fd,
        // Released between the query and now (the exiting daemon's last reference went):
        // nothing is attached any more, as when the detach itself finds it gone.
        Err(_) if program_info(prog_id).is_none() => {
            return Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
        Err(e) => return Err(io::Error::other(format!("cannot open program: {e}"))),
    };
    let mut attr = Attr::default();
    attr.put_u32(0, cgroup_dir.as_raw_fd() as u32);
    attr.put_u32(4, std::os::fd::AsFd::as_fd(&prog_fd).as_raw_fd() as u32);
    attr.put_u32(8, attach_type);
    attr.sys(BPF_PROG_DETACH)?;
    Ok(())
}
