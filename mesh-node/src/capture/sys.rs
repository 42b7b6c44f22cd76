//! The few `bpf()` commands aya does not offer in the form the capture needs, called directly:
//! opening a pinned object as a raw fd, reading a link's target, and swapping the program of
//! a link in place.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_LINK_TYPE_CGROUP`, `_TCX` and `_SOCKMAP` in the kernel's link types.
pub const LINK_TYPE_CGROUP: u32 = 3;
pub const LINK_TYPE_TCX: u32 = 11;
pub const LINK_TYPE_SOCKMAP: u32 = 14;

/// `BPF_CGROUP_SOCK_OPS` in the kernel's attach types.
pub const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
/// `BPF_SK_MSG_VERDICT` in the kernel's attach types.
pub const ATTACH_SK_MSG_VERDICT: u32 = 7;

/// A zeroed `union bpf_attr`, written field by field at the kernel ABI's offsets.
#[repr(C, align(8))]
pub(super) struct Attr([u8; 128]);

impl Default for Attr {
    fn default() -> Self {
        Self([0; 128])
    }
}

impl Attr {
    pub(super) fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    pub(super) fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    pub(super) fn get_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
    pub(super) fn sys(&mut self, cmd: libc::c_long) -> io::Result<i32> {
        // SAFETY: `self` is a properly aligned, large-enough bpf_attr for every command used.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as i32)
        }
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

/// Opens the object pinned at `path` (a map, a program or a link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = Attr::default();
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = attr.sys(BPF_OBJ_GET)?;
    // SAFETY: the syscall returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the object `fd` at `path` (whose directory must exist); `EEXIST` if something is
/// pinned there already.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = Attr::default();
    attr.put_u64(0, c.as_ptr() as u64);
    attr.put_u32(8, fd.as_raw_fd() as u32);
    attr.sys(BPF_OBJ_PIN)?;
    Ok(())
}

/// Attaches `prog` to `target` (a cgroup's fd, or an interface index of the calling thread's
/// netns for tcx) with a new link, appended after the programs already there.
pub fn link_create(prog: BorrowedFd<'_>, target: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, target);
    attr.put_u32(8, attach_type);
    let fd = attr.sys(BPF_LINK_CREATE)?;
    // SAFETY: the syscall returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the kernel says of a map: `struct bpf_map_info`'s first fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The map's id (`struct bpf_map_info`'s second field).
pub fn map_id(map: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(obj_info(map)?.u32_at(4))
}

pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let info = obj_info(map)?;
    Ok(MapInfo {
        map_type: info.u32_at(0),
        key_size: info.u32_at(8),
        value_size: info.u32_at(12),
        max_entries: info.u32_at(16),
        flags: info.u32_at(20),
    })
}

/// `BPF_MAP_TYPE_HASH`, `_ARRAY` and `_LRU_HASH`: the kinds whose entries [`copy_entries`]
/// can move (one value per key, not per CPU).
pub const COPYABLE_MAP_TYPES: [u32; 3] = [1, 2, 9];

/// Copies up to `limit` entries of map `from` into map `to` (same key and value sizes, one of
/// [`COPYABLE_MAP_TYPES`]), overwriting what `to` holds under the same keys; how many it
/// copied. An entry `to` has no room for is skipped.
pub fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    limit: u32,
) -> io::Result<u32> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut copied = 0;
    let mut first = true;
    for _ in 0..limit {
        let mut attr = Attr::default();
        attr.put_u32(0, from.as_raw_fd() as u32);
        // A null key asks for the first one.
        attr.put_u64(8, if first { 0 } else { key.as_ptr() as u64 });
        attr.put_u64(16, next.as_mut_ptr() as u64);
        match attr.sys(BPF_MAP_GET_NEXT_KEY) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        key.copy_from_slice(&next);
        let mut attr = Attr::default();
        attr.put_u32(0, from.as_raw_fd() as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_mut_ptr() as u64);
        // Deleted since it was listed: nothing to carry over.
        if attr.sys(BPF_MAP_LOOKUP_ELEM).is_err() {
            continue;
        }
        let mut attr = Attr::default();
        attr.put_u32(0, to.as_raw_fd() as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_ptr() as u64);
        if attr.sys(BPF_MAP_UPDATE_ELEM).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}

/// The first 128 bytes of what `BPF_OBJ_GET_INFO_BY_FD` says of `fd`.
#[repr(C, align(8))]
struct ObjInfo([u8; 128]);

impl ObjInfo {
    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_ne_bytes(b)
    }
}

fn obj_info(fd: BorrowedFd<'_>) -> io::Result<ObjInfo> {
    let mut info = ObjInfo([0; 128]);
    let mut attr = Attr::default();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u32(4, info.0.len() as u32);
    attr.put_u64(8, info.0.as_mut_ptr() as u64);
    attr.sys(BPF_OBJ_GET_INFO_BY_FD)?;
    Ok(info)
}

/// What the kernel says of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// The cgroup id of a cgroup link; the interface index of a tcx link, 0 once its
    /// interface (or the interface's netns) is gone; the map id of a sockmap link.
    pub target: u64,
    pub attach_type: u32,
}

/// `struct bpf_link_info`: type, id, prog_id, then a union at offset 16 whose cgroup member is
/// `{ u64 cgroup_id; u32 attach_type; }`, whose tcx member is `{ u32 ifindex; u32
/// attach_type; }` and whose sockmap member is `{ u32 map_id; u32 attach_type; }`.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let info = obj_info(link)?;
    let link_type = info.u32_at(0);
    let (target, attach_type) = match link_type {
        LINK_TYPE_CGROUP => (info.u64_at(16), info.u32_at(24)),
        LINK_TYPE_TCX | LINK_TYPE_SOCKMAP => (u64::from(info.u32_at(16)), info.u32_at(20)),
        _ => (0, 0),
    };
    Ok(LinkInfo {
        link_type,
        id: info.u32_at(4),
        prog_id: info.u32_at(8),
        target,
        attach_type,
    })
}

/// Makes `link` run `prog` from now on, atomically: no packet or connect sees neither.
/// `ENOLINK` means the link is defunct (its cgroup or interface is gone).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, prog.as_raw_fd() as u32);
    attr.sys(BPF_LINK_UPDATE)?;
    Ok(())
}
