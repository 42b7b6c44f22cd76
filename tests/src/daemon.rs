//! A Mycel daemon process started by a test: its log file, a scratch directory, and a stop that
//! always happens (in `Drop` too, even when the test panics).

use std::{
    fs, io,
    path::PathBuf,
    process::{Child, ExitStatus},
    thread,
    time::{Duration, Instant},
};

pub struct Daemon {
    name: &'static str,
    child: Option<Child>,
    pub log_file: PathBuf,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn new(name: &'static str, child: Child, dir: PathBuf, log_file: PathBuf) -> Self {
        Self {
            name,
            child: Some(child),
            log_file,
            dir,
        }
    }

    /// A handle whose process is started later with [`Daemon::replace`].
    pub fn not_started(name: &'static str, dir: PathBuf, log_file: PathBuf) -> Self {
        Self {
            name,
            child: None,
            log_file,
            dir,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// An error carrying the log when the process has exited.
    pub fn check_running(&mut self) -> io::Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            return Err(io::Error::other(format!(
                "{} exited ({status}):\n{}",
                self.name,
                self.log()
            )));
        }
        Ok(())
    }

    /// Polls `cond` every 50 ms until it returns `Some`, failing with the log if the process
    /// exits or `timeout` passes.
    pub fn wait_until<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut() -> Option<T>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if let Some(v) = cond() {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{what}: not within {timeout:?}\n{} log:\n{}",
                        self.name,
                        self.log()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits for the exit status (killing after 15 s).
    pub fn stop_with(&mut self, signal: i32) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(io::Error::other("already stopped"));
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.child.is_none()
    }

    /// Makes `child` the process of this handle (stopping any previous one), keeping log and
    /// dir.
    pub fn replace(&mut self, child: Child) {
        if self.child.is_some() {
            let _ = self.stop_with(libc::SIGTERM);
        }
        self.child = Some(child);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_with(libc::SIGTERM);
        }
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("{} log kept at {}", self.name, self.log_file.display());
        }
    }
}
