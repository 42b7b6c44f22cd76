//! Following what an operator edits in place, a file or a directory of files, by reading it
//! every interval: mesh-node's offline workloads file and mesh-cp's config dir.

use std::{fmt::Display, sync::Arc, time::Duration};

use tokio::time::{Interval, MissedTickBehavior};

/// Reads its source every interval and wakes its caller only when what it read differs from
/// what it last saw.
pub struct Follower<T, R> {
    read: Arc<R>,
    tick: Interval,
    /// The last contents read, or the applied ones until a read differs.
    contents: T,
    /// Set while the source cannot be read, to the error's text: an outage is one change, not
    /// one per tick, and a different error is a change of its own.
    outage: Option<String>,
}

/// Polls at least this far apart: a zero period would make tokio's interval panic.
const SHORTEST: Duration = Duration::from_millis(1);

impl<T, E, R> Follower<T, R>
where
    T: PartialEq + Send + 'static,
    E: Display + Send + 'static,
    R: Fn() -> Result<T, E> + Send + Sync + 'static,
{
    /// `applied` is what is in force; the first read is compared with it, so an edit made
    /// while the daemon was starting is seen as a change.
    pub fn new(interval: Duration, applied: T, read: R) -> Self {
        let mut tick = tokio::time::interval(interval.max(SHORTEST));
        // After a slow apply, one read is enough to catch up.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            read: Arc::new(read),
            tick,
            contents: applied,
            outage: None,
        }
    }

    /// The contents once they differ from the last seen, or the error once the source cannot
    /// be read. Cancel-safe: dropped before it returns, nothing is taken as seen.
    pub async fn changed(&mut self) -> Result<&T, E> {
        let outcome = loop {
            self.tick.tick().await;
            // Reading touches the filesystem, which may block (NFS, a slow disk): off the
            // runtime's workers, which also serve the data path.
            let read = self.read.clone();
            let outcome = match tokio::task::spawn_blocking(move || read()).await {
                Ok(outcome) => outcome,
                Err(join) => {
                    tracing::error!(error = %join, "the reader of a followed file panicked");
                    continue;
                }
            };
            let same = match (&outcome, &self.outage) {
                (Ok(new), None) => *new == self.contents,
                (Err(e), Some(old)) => e.to_string() == *old,
                _ => false,
            };
            if !same {
                break outcome;
            }
        };
        match outcome {
            Ok(new) => {
                self.contents = new;
                self.outage = None;
                Ok(&self.contents)
            }
            Err(e) => {
                self.outage = Some(e.to_string());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const TICK: Duration = Duration::from_millis(5);
    /// Many ticks: long enough for a change to have been seen, had there been one.
    const QUIET: Duration = Duration::from_millis(100);
    /// A change is awaited this long, for a loaded machine, before the test fails.
    const PATIENCE: Duration = Duration::from_secs(10);

    type Source = Arc<Mutex<Result<String, String>>>;

    fn follower(
        initial: &str,
    ) -> (
        Source,
        Follower<String, impl Fn() -> Result<String, String> + Send + Sync>,
    ) {
        let source: Source = Arc::new(Mutex::new(Ok(initial.to_owned())));
        let reader = source.clone();
        let read = move || reader.lock().map_err(|e| e.to_string())?.clone();
        (source, Follower::new(TICK, initial.to_owned(), read))
    }

    fn set(source: &Source, to: Result<&str, &str>) {
        *source.lock().unwrap() = to.map(str::to_owned).map_err(str::to_owned);
    }

    async fn next<T: Clone + PartialEq + Send + 'static, E: Display + Send + 'static>(
        f: &mut Follower<T, impl Fn() -> Result<T, E> + Send + Sync + 'static>,
    ) -> Result<T, E> {
        tokio::time::timeout(PATIENCE, f.changed())
            .await
            .expect("no change seen")
            .cloned()
    }

    /// True if nothing changes for a while.
    async fn quiet<T: PartialEq + Send + 'static, E: Display + Send + 'static>(
        f: &mut Follower<T, impl Fn() -> Result<T, E> + Send + Sync + 'static>,
    ) -> bool {
        tokio::time::timeout(QUIET, f.changed()).await.is_err()
    }

    #[tokio::test]
    async fn what_is_applied_is_no_change() {
        let (_source, mut f) = follower("a");
        assert!(quiet(&mut f).await);
    }

    #[tokio::test]
    async fn a_change_is_yielded_once() {
        let (source, mut f) = follower("a");
        set(&source, Ok("b"));
        assert_eq!(next(&mut f).await, Ok("b".to_owned()));
        assert!(quiet(&mut f).await);
        set(&source, Ok("a"));
        assert_eq!(next(&mut f).await, Ok("a".to_owned()));
    }

    #[tokio::test]
    async fn an_unreadable_source_is_one_change() {
        let (source, mut f) = follower("a");
        set(&source, Err("gone"));
        assert_eq!(next(&mut f).await, Err("gone".to_owned()));
        assert!(quiet(&mut f).await, "the same outage again");
        set(&source, Err("denied"));
        assert_eq!(next(&mut f).await, Err("denied".to_owned()));
        // Back as it was before the outage: a change, since the outage was the last seen.
        set(&source, Ok("a"));
        assert_eq!(next(&mut f).await, Ok("a".to_owned()));
        assert!(quiet(&mut f).await);
    }

    #[tokio::test]
    async fn a_file_on_disk_is_followed() {
        let path = std::env::temp_dir().join(format!("mesh-daemon-follow-{}", std::process::id()));
        std::fs::write(&path, "a").unwrap();
        let reader = path.clone();
        let mut f = Follower::new(TICK, "a".to_owned(), move || {
            std::fs::read_to_string(&reader)
        });
        assert!(quiet(&mut f).await);
        std::fs::write(&path, "b").unwrap();
        assert_eq!(next(&mut f).await.ok(), Some("b".to_owned()));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(next(&mut f).await, Err(e) if e.kind() == std::io::ErrorKind::NotFound));
        assert!(quiet(&mut f).await);
    }

    #[tokio::test]
    async fn a_zero_interval_polls_instead_of_panicking() {
        let source: Source = Arc::new(Mutex::new(Ok("b".to_owned())));
        let read = move || source.lock().map_err(|e| e.to_string())?.clone();
        let mut f = Follower::new(Duration::ZERO, "a".to_owned(), read);
        assert_eq!(next(&mut f).await, Ok("b".to_owned()));
    }
}
