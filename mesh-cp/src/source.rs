//! The universal-mode config source: a directory of YAML documents, polled for changes.
//!
//! Each change is validated as a whole set. A good set is published with the next version; a
//! bad one is logged once and shown on the status endpoint, and the last good set stays in
//! force until the files are fixed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_model::{Config, ConfigError};
use tokio::sync::watch;

use crate::state::{publish_if_changed, ConfigStatus, Published, Shared};

/// What the directory held the last time it was read.
type Snapshot = Vec<(PathBuf, String)>;

/// Loads the directory at start. An invalid directory here is a startup error: with no last
/// good config to keep, serving an empty one would unenroll every workload in the mesh.
pub fn initial(dir: &Path) -> Result<(Config, Snapshot), ConfigError> {
    let files = mesh_model::read_dir(dir)?;
    let config = mesh_model::parse(&files)?;
    Ok((config, files))
}

/// Polls `dir` every `interval` and publishes each valid change.
pub async fn watch_dir(
    dir: PathBuf,
    interval: Duration,
    mut last: Snapshot,
    publish: watch::Sender<Published>,
    shared: Arc<Shared>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let read = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || mesh_model::read_dir(&dir)).await
        };
        let outcome = match read {
            Ok(Ok(files)) if files == last => continue,
            Ok(Ok(files)) => mesh_model::parse(&files).map(|c| (c, files)),
            Ok(Err(e)) => Err(e),
            Err(join) => {
                tracing::error!(error = %join, "config reader panicked");
                continue;
            }
        };
        match outcome {
            Ok((config, files)) => {
                last = files;
                last_error = None;
                let (version, _) = publish_if_changed(&publish, config);
                shared.set_config_status(ConfigStatus::ok(version));
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::error!(file = %e.file().display(), "config rejected, keeping the last good config: {message}");
                    shared.metrics.config_rejected();
                    last_error = Some(message.clone());
                }
                let version = publish.borrow().version;
                shared.set_config_status(ConfigStatus {
                    version,
                    error: Some(message),
                    error_file: Some(e.file().to_path_buf()),
                    checked_at: SystemTime::now(),
                });
            }
        }
    }
}
