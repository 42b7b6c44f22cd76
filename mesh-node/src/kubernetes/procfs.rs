//! Finding the netns of pods that were already running when the daemon started (or whose
//! namespace skips the CNI plugin): a process of the pod is in the pod's cgroup, whose path
//! names the pod's uid (`…/pod<uid>/…` with the cgroupfs driver,
//! `…-pod<uid with _>.slice/…` with the systemd one), and its `ns/net` is the pod's netns.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

/// The pod uid that `cgroup` (the contents of `/proc/PID/cgroup`) names, among `wanted`.
fn pod_uid<'a>(cgroup: &str, wanted: &'a HashSet<String>) -> Option<&'a String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/').find_map(|part| {
        let after = &part[part.rfind("pod")? + 3..];
        let uid = after.strip_suffix(".slice").unwrap_or(after);
        wanted
            .iter()
            .find(|w| uid == w.as_str() || uid == w.replace('-', "_"))
    })
}

/// For each uid of `wanted` that some process under `proc` belongs to, that process's
/// `ns/net` (under `proc`, so the path stays valid from the daemon's own mount namespace).
pub fn find_netns(proc: &Path, wanted: &HashSet<String>) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let Ok(entries) = fs::read_dir(proc) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Processes come and go while we read: a vanished one is skipped.
        let Ok(cgroup) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if let Some(uid) = pod_uid(&cgroup, wanted) {
            found
                .entry(uid.clone())
                .or_insert_with(|| entry.path().join("ns/net"));
            if found.len() == wanted.len() {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cgroup_drivers_name_the_pod() {
        let wanted: HashSet<String> = ["0b6c-11aa".to_owned(), "77".to_owned()].into();
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6c_11aa.slice/cri-containerd-abc.scope\n";
        let cgroupfs = "0::/kubepods/besteffort/pod0b6c-11aa/abc\n";
        assert_eq!(
            pod_uid(systemd, &wanted).map(String::as_str),
            Some("0b6c-11aa")
        );
        assert_eq!(
            pod_uid(cgroupfs, &wanted).map(String::as_str),
            Some("0b6c-11aa")
        );
        assert_eq!(pod_uid("0::/kubepods/pod99/x\n", &wanted), None);
        assert_eq!(pod_uid("0::/system.slice/sshd.service\n", &wanted), None);
    }

    #[test]
    fn finds_a_process_of_each_wanted_pod() {
        let dir = std::env::temp_dir().join(format!("mesh-node-procfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (pid, cgroup) in [
            ("10", "0::/kubepods/pod77/c1\n"),
            ("11", "0::/user.slice\n"),
            ("self", "0::/kubepods/pod88/c1\n"),
        ] {
            fs::create_dir_all(dir.join(pid)).unwrap();
            fs::write(dir.join(pid).join("cgroup"), cgroup).unwrap();
        }
        let wanted: HashSet<String> = ["77".to_owned(), "88".to_owned()].into();
        let found = find_netns(&dir, &wanted);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found["77"], dir.join("10/ns/net"));
    }
}
