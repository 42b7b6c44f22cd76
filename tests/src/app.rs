//! The test application (`tests/apps/app.py`), run inside pods.

use std::{
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::topology::{run_with_timeout, spawn_in, Pod};

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps/app.py")
}

fn python(args: &[&str]) -> Command {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script()).args(args);
    cmd
}

/// A server process in a pod; killed on drop.
pub struct Server(Child);

impl Server {
    pub fn start(pod: &Pod, port: u16) -> io::Result<Self> {
        Self::launch(pod, &["serve", &port.to_string()])
    }

    /// A server that appends the peer address of every connection it accepts to `log`.
    pub fn start_logging(pod: &Pod, port: u16, log: &Path) -> io::Result<Self> {
        let log = log.to_string_lossy();
        Self::launch(pod, &["serve", &port.to_string(), &log])
    }

    /// A server that speaks first and closes at once (`app.py greet`), logging each peer.
    pub fn start_greeter(pod: &Pod, port: u16, log: &Path) -> io::Result<Self> {
        let log = log.to_string_lossy();
        Self::launch(pod, &["greet", &port.to_string(), &log])
    }

    fn launch(pod: &Pod, args: &[&str]) -> io::Result<Self> {
        Self::spawn(pod, &mut python(args))
    }

    /// Starts `cmd` in `pod` and waits for it to print `listening` (every server the tests
    /// run does, once it accepts connections).
    pub fn spawn(pod: &Pod, cmd: &mut Command) -> io::Result<Self> {
        let mut child = pod.spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "listening" {
            let _ = child.kill();
            return Err(io::Error::other(format!("server did not start: {line:?}")));
        }
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `app.py ARGS` in `pod` (its netns and cgroup) and parses the JSON it prints.
pub fn run(pod: &Pod, args: &[&str], timeout: Duration) -> serde_json::Value {
    run_where(&pod.netns_path(), Some(&pod.cgroup), args, timeout)
}

/// Runs `app.py ARGS` in a netns and, optionally, a cgroup.
pub fn run_where(
    netns: &Path,
    cgroup: Option<&Path>,
    args: &[&str],
    timeout: Duration,
) -> serde_json::Value {
    let mut cmd = python(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = spawn_in(Some(netns), cgroup, &mut cmd).expect("spawn app.py");
    finish(child, timeout)
}

/// Starts `app.py ARGS` in `pod` without waiting; collect it with [`finish`].
pub fn start(pod: &Pod, args: &[&str]) -> io::Result<Child> {
    pod.spawn(python(args).stdout(Stdio::piped()).stderr(Stdio::piped()))
}

/// Waits for an app started with [`start`] and parses the JSON it printed.
pub fn finish(child: Child, timeout: Duration) -> serde_json::Value {
    finish_json(child, timeout, "app.py")
}

/// Waits for a test program (`what`, for the messages) that prints JSON as its last line, and
/// parses that line; it must succeed.
pub fn finish_json(child: Child, timeout: Duration, what: &str) -> serde_json::Value {
    let out = run_with_timeout(child, timeout).unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.trim().lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what} printed {stdout:?}: {e}"))
}
