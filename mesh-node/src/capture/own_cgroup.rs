//! The daemon's own cgroup, which the connect hooks exempt: the proxy's connects come from
//! its tasks.
//!
//! The id is the cgroup directory's inode number on the cgroup2 filesystem (what
//! `bpf_get_current_cgroup_id` returns). The directory is found as the kernel presents it to
//! this process: the path in `/proc/self/cgroup` is relative to the process's cgroup
//! namespace root, so it is resolved against a cgroup2 mount whose own root (in
//! `/proc/self/mountinfo`) is a prefix of it. In a container that is usually the container's
//! `/sys/fs/cgroup`, not a host mount of the whole tree.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum OwnCgroupError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("/proc/self/cgroup has no cgroup v2 entry (\"0::/...\"); mesh-node needs the unified hierarchy")]
    NotUnified,
    #[error("no cgroup2 mount shows this daemon's cgroup {0}; mount the cgroup2 filesystem so that it does")]
    NotMounted(String),
}

/// The daemon's cgroup: its directory and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCgroup {
    pub dir: PathBuf,
    pub id: u64,
}

impl OwnCgroup {
    pub fn find() -> Result<Self, OwnCgroupError> {
        let read = |p: &str| {
            fs::read_to_string(p).map_err(|source| OwnCgroupError::Read {
                path: p.into(),
                source,
            })
        };
        let dir = resolve(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)?;
        let id = fs::metadata(&dir)
            .map_err(|source| OwnCgroupError::Read {
                path: dir.clone(),
                source,
            })?
            .ino();
        Ok(Self { dir, id })
    }

    /// Processes in the daemon's cgroup other than the daemon: their connects are not
    /// captured either.
    pub fn others(&self) -> Vec<u32> {
        let me = std::process::id();
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|pid| *pid != me)
            .collect()
    }
}

/// The directory of the cgroup in `proc_cgroup` (a `/proc/<pid>/cgroup`), under the first
/// cgroup2 mount in `mountinfo` whose root is a prefix of it.
fn resolve(proc_cgroup: &str, mountinfo: &str) -> Result<PathBuf, OwnCgroupError> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(OwnCgroupError::NotUnified)?
        .trim();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source ...
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        if after.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = before.split_whitespace();
        let (Some(root), Some(mount)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let Some(rest) = strip_dir_prefix(path, root) else {
            continue;
        };
        return Ok(Path::new(&unescape(mount)).join(rest.trim_start_matches('/')));
    }
    Err(OwnCgroupError::NotMounted(path.to_owned()))
}

/// `path` without the directory `prefix` ("/" is a prefix of everything), if it has it.
fn strip_dir_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroups below `root` (the cgroup2 mount) whose id (their directory's inode) is in
/// `ids` and that have processes.
pub fn with_processes(root: &Path, ids: &std::collections::HashSet<u64>) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    fn walk(
        dir: &Path,
        ids: &std::collections::HashSet<u64>,
        depth: usize,
        out: &mut Vec<PathBuf>,
    ) {
        if depth > 16 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            if e.metadata().is_ok_and(|m| ids.contains(&m.ino())) {
                let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
                if !procs.trim().is_empty() {
                    out.push(path.clone());
                }
            }
            walk(&path, ids, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    if !ids.is_empty() {
        walk(root, ids, 0, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn a_host_process_finds_its_cgroup_under_the_mount() {
        let dir = resolve("0::/system.slice/mycel-node.service\n", HOST).unwrap();
        assert_eq!(
            dir,
            Path::new("/sys/fs/cgroup/system.slice/mycel-node.service")
        );
    }

    /// In a container with its own cgroup namespace, /proc/self/cgroup says "/": the
    /// container's /sys/fs/cgroup shows it, a host mount of the whole tree does not.
    #[test]
    fn a_container_finds_its_cgroup_under_its_own_mount() {
        let mounts = "\
1200 1100 0:28 /../../.. /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw
1201 1100 0:28 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw
";
        assert_eq!(
            resolve("0::/\n", mounts).unwrap(),
            Path::new("/sys/fs/cgroup/")
        );
    }

    #[test]
    fn a_mount_of_another_subtree_is_skipped_and_escapes_are_read() {
        let mounts = "\
40 30 0:28 /kubepods.slice /mnt/pods rw - cgroup2 cgroup2 rw
41 30 0:28 /system.slice /mnt/my\\040cg rw - cgroup2 cgroup2 rw
";
        let dir = resolve("0::/system.slice/a\n", mounts).unwrap();
        assert_eq!(dir, Path::new("/mnt/my cg/a"));
        assert!(matches!(
            resolve("0::/user.slice\n", mounts),
            Err(OwnCgroupError::NotMounted(_))
        ));
        assert!(matches!(
            resolve("1:cpu:/x\n", HOST),
            Err(OwnCgroupError::NotUnified)
        ));
        // "/system.slice" is not a prefix of "/system.slice2".
        assert!(resolve("0::/system.slice2\n", mounts).is_err());
    }

    #[test]
    fn this_process_has_a_cgroup_with_an_id() {
        let own = OwnCgroup::find().unwrap();
        assert!(own.dir.is_dir(), "{own:?}");
        assert!(own.id >= 1, "{own:?}");
    }
}
