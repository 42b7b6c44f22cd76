//! The universal-mode config source: a directory of YAML documents, polled for changes.
//!
//! Each change is validated as a whole set. A good set is published with the next version; a
//! bad one, or a directory that cannot be read, is logged once and shown on the status
//! endpoint, and the last good set stays in force until the files are fixed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_daemon::follow::Follower;
use mesh_model::{Config, ConfigError, Parser};
use tokio::sync::watch;

use crate::state::{publish_if_changed, ConfigStatus, Published, Shared};

/// What the directory held the last time it was read.
type Snapshot = Vec<(PathBuf, String)>;

/// Loads the directory at start. An invalid directory here is a startup error: with no last
/// good config to keep, serving an empty one would unenroll every workload in the mesh.
/// The parser keeps what it parsed, so that a change later parses only the files it touched.
pub fn initial(dir: &Path) -> Result<(Config, Snapshot, Parser), ConfigError> {
    let files = mesh_model::read_dir(dir)?;
    let mut parser = Parser::default();
    let config = parser.parse(&files)?;
    Ok((config, files, parser))
}

/// Polls `dir` every `interval` and publishes each valid change.
pub async fn watch_dir(
    dir: PathBuf,
    interval: Duration,
    applied: Snapshot,
    mut parser: Parser,
    publish: watch::Sender<Published>,
    shared: Arc<Shared>,
) {
    let mut follower = Follower::new(interval, applied, move || mesh_model::read_dir(&dir));
    let mut rejected = Rejected::default();
    loop {
        let outcome = match follower.changed().await {
            Ok(files) => parser.parse(files),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(config) => {
                rejected.cleared();
                let (version, _) = publish_if_changed(&publish, config);
                shared.set_config_status(ConfigStatus::ok(version));
            }
            Err(e) => rejected.report(&e, publish.borrow().version, &shared),
        }
    }
}

/// The change last rejected, said once however often it is read again.
#[derive(Default)]
pub(crate) struct Rejected {
    last: Option<String>,
}

impl Rejected {
    /// The source is valid again.
    pub fn cleared(&mut self) {
        self.last = None;
    }

    /// Logs and counts `e` if it is new, and shows it on `/status` beside `version`, the one
    /// that stays in force.
    pub fn report(&mut self, e: &ConfigError, version: u64, shared: &Shared) {
        let message = e.to_string();
        if self.last.as_deref() != Some(message.as_str()) {
            tracing::error!(file = %e.file().display(), "config rejected, keeping the last good config: {message}");
            shared.metrics.config_rejected();
            self.last = Some(message.clone());
        }
        shared.set_config_status(ConfigStatus {
            version,
            error: Some(message),
            error_file: Some(e.file().to_path_buf()),
            checked_at: SystemTime::now(),
        });
    }
}
