//! The first config version of a control-plane run: above every version an earlier run
//! published, so that `mycel_cp_config_version` and what nodes are told never go back when
//! mesh-cp restarts.
//!
//! A run's versions go up by one per accepted change: at most one per read of the config dir
//! (every 0.5 s by default) or per settled batch of Kubernetes events (100 ms), each far
//! longer than a millisecond. A run that starts at the current Unix time in milliseconds
//! therefore starts above whatever the last run reached, however long it ran. The first version is kept in the data dir, and the next
//! run starts above it too, should the clock have gone back.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

/// The file in the data dir that holds the last run's first version.
pub const FILE: &str = "config-version";

#[derive(Debug, thiserror::Error)]
pub enum FirstVersionError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a version (a decimal number); remove it to start from the clock"
    )]
    Corrupt { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// This run's first version: the later of `now` in Unix milliseconds and one past the last
/// run's first version; recorded in `data_dir` for the next run.
pub fn take(data_dir: &Path, now: SystemTime) -> Result<u64, FirstVersionError> {
    let path = data_dir.join(FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => Some(
            text.trim()
                .parse::<u64>()
                .map_err(|_| FirstVersionError::Corrupt { path: path.clone() })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(FirstVersionError::Read { path, source }),
    };
    let clock = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let first = clock.max(last.map_or(1, |l| l.saturating_add(1))).max(1);
    record(&path, first)?;
    Ok(first)
}

/// Writes `version` whole or not at all (a file beside it, renamed over it).
fn record(path: &Path, version: u64) -> Result<(), FirstVersionError> {
    // The mode File::create gives, as before.
    crate::files::replace(
        path,
        &path.with_extension("tmp"),
        format!("{version}\n").as_bytes(),
        0o666,
    )
    .map_err(|(_, source)| FirstVersionError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A data dir removed when the test ends, however it ends.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "mycel-t-first-version-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn each_run_starts_above_the_last() {
        let guard = dir("runs");
        let d = &guard.0;
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(take(d, at(5_000)).unwrap(), 5_000);
        // Later: the clock.
        assert_eq!(take(d, at(9_000)).unwrap(), 9_000);
        // The clock went back: above the last run's first version all the same.
        assert_eq!(take(d, at(1_000)).unwrap(), 9_001);
        assert_eq!(std::fs::read_to_string(d.join(FILE)).unwrap(), "9001\n");
    }

    #[test]
    fn a_file_that_is_not_a_version_is_a_clear_error() {
        let guard = dir("corrupt");
        let d = &guard.0;
        std::fs::write(d.join(FILE), "twelve").unwrap();
        let e = take(d, SystemTime::now()).unwrap_err().to_string();
        assert!(
            e.contains("config-version") && e.contains("remove it"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
