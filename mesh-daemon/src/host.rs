//! What a node's host must offer mesh-node, found and checked the same way by mesh-node at
//! start and by `mycel check --pre`: the cgroup v2 hierarchy the programs attach to.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Where mesh-node's programs attach and why they cannot.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Mounts { path: PathBuf, source: io::Error },
    #[error(
        "no cgroup2 mount in {mounts}: mesh-node attaches to the host's cgroup v2 hierarchy. \
         If it runs under `ip netns exec`, which mounts a fresh /sys without it, run it in the \
         host's mount namespace instead (`nsenter --net=/run/netns/NAME mesh-node ...`), or \
         mount cgroup2 and pass --cgroup"
    )]
    NoMount { mounts: PathBuf },
    #[error(
        "cgroup {path} does not exist: --cgroup must name a directory of the host's cgroup v2 \
         hierarchy{}",
        mounted_at(.root)
    )]
    Missing {
        path: PathBuf,
        root: Option<PathBuf>,
    },
    #[error(
        "{path} is not in a cgroup v2 hierarchy (a cgroup v1 controller, or not a cgroup): \
         --cgroup must name a directory of the host's cgroup v2 hierarchy{}",
        mounted_at(.root)
    )]
    NotCgroup2 {
        path: PathBuf,
        root: Option<PathBuf>,
    },
    #[error("cannot inspect cgroup {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
}

fn mounted_at(root: &Option<PathBuf>) -> String {
    match root {
        Some(r) => format!(" (mounted at {} here)", r.display()),
        None => String::new(),
    }
}

/// The mount point of the cgroup v2 hierarchy, from `mounts` (`/proc/mounts`):
/// `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts.
pub fn cgroup2_root(mounts: &Path) -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string(mounts).map_err(|source| CgroupError::Mounts {
        path: mounts.to_path_buf(),
        source,
    })?;
    find_cgroup2(&text).ok_or_else(|| CgroupError::NoMount {
        mounts: mounts.to_path_buf(),
    })
}

/// The first cgroup2 mount point in the text of `/proc/mounts`.
pub fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// `path` if it is a directory of a cgroup v2 hierarchy; else why not, naming where this
/// host's hierarchy is mounted.
pub fn check_cgroup2(path: &Path) -> Result<(), CgroupError> {
    let root = || cgroup2_root(Path::new("/proc/mounts")).ok();
    match nix::sys::statfs::statfs(path) {
        // A cgroup is a directory; its files (cgroup.procs, …) are on the same filesystem.
        Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC && path.is_dir() => {
            Ok(())
        }
        Ok(_) => Err(CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
            root: root(),
        }),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => Err(CgroupError::Missing {
            path: path.to_path_buf(),
            root: root(),
        }),
        Err(e) => Err(CgroupError::Stat {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_cgroup2_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(find_cgroup2("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn a_cgroup_that_is_not_there_or_not_v2_says_so() {
        let missing = check_cgroup2(Path::new("/sys/fs/cgroup/no-such-mycel-cgroup")).unwrap_err();
        assert!(matches!(missing, CgroupError::Missing { .. }), "{missing}");
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let proc = check_cgroup2(Path::new("/proc")).unwrap_err();
        assert!(matches!(proc, CgroupError::NotCgroup2 { .. }), "{proc}");
        let root = cgroup2_root(Path::new("/proc/mounts")).expect("these machines have cgroup2");
        check_cgroup2(&root).expect("the cgroup2 mount is cgroup v2");
        let file = check_cgroup2(&root.join("cgroup.procs")).unwrap_err();
        assert!(matches!(file, CgroupError::NotCgroup2 { .. }), "{file}");
    }
}
