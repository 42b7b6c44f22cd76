//! A real browser for the tests: Debian's Chromium, headless, in a network namespace of its own
//! with only a loopback (nothing it does reaches anything but what a test relays into it), in
//! a cgroup of the topology (whatever it leaves running goes with the topology).

use std::{
    fs, io,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::topology::{run_with_timeout, spawn_in, Topology};

/// How long one page may take to load and render.
const PAGE: Duration = Duration::from_secs(90);

pub struct Browser {
    /// Its netns: relay a server into it (`Relay::start_in`).
    pub netns: PathBuf,
    cgroup: PathBuf,
    /// Scratch: a profile per run, what each run printed, screenshots; removed on drop.
    dir: PathBuf,
    runs: std::cell::Cell<u32>,
}

impl Browser {
    pub fn new(topo: &mut Topology) -> io::Result<Self> {
        let netns = topo
            .add_isolated_netns("browser")
            .map_err(|e| io::Error::other(e.0))?;
        let root = topo.cgroup_root.clone();
        let cgroup = topo
            .add_cgroup_below(&root, "browser")
            .map_err(|e| io::Error::other(e.0))?;
        let dir = std::env::temp_dir().join(format!("{}-chromium", topo.prefix));
        fs::create_dir_all(&dir)?;
        Ok(Self {
            netns,
            cgroup,
            dir,
            runs: std::cell::Cell::new(0),
        })
    }

    /// The page at `url` once its scripts have run (`budget` of virtual time), as HTML.
    pub fn dump_dom(&self, url: &str, budget: Duration) -> io::Result<String> {
        let out = self.run(&["--dump-dom".to_owned()], url, budget)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A PNG of the page at `url`, `width` × `height`: its path, in the browser's scratch
    /// directory (gone with the browser).
    pub fn screenshot(
        &self,
        url: &str,
        budget: Duration,
        (width, height): (u32, u32),
    ) -> io::Result<PathBuf> {
        let path = self.dir.join(format!("screenshot-{}.png", self.runs.get()));
        self.run(
            &[
                format!("--screenshot={}", path.display()),
                format!("--window-size={width},{height}"),
                "--hide-scrollbars".to_owned(),
            ],
            url,
            budget,
        )?;
        if !path.exists() {
            return Err(io::Error::other(format!(
                "chromium wrote no screenshot to {}",
                path.display()
            )));
        }
        Ok(path)
    }

    /// Runs Chromium once, with a profile of its own (two runs never share one), its output
    /// to files (a page larger than a pipe's buffer must not stall it): what it printed.
    fn run(&self, extra: &[String], url: &str, budget: Duration) -> io::Result<Vec<u8>> {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let profile = self.dir.join(format!("profile-{n}"));
        let (stdout, stderr) = (
            self.dir.join(format!("stdout-{n}")),
            self.dir.join(format!("stderr-{n}")),
        );
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--run-all-compositor-stages-before-draw",
            // No name is looked up: nothing can be, in its netns, and nothing is tried.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout)?)
        .stderr(fs::File::create(&stderr)?);
        let child = spawn_in(Some(&self.netns), Some(&self.cgroup), &mut cmd).map_err(|e| {
            io::Error::other(format!(
                "cannot run chromium (apt-get install chromium): {e}"
            ))
        })?;
        let out = run_with_timeout(child, PAGE)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "chromium {}: {}",
                out.status,
                fs::read_to_string(&stderr).unwrap_or_default()
            )));
        }
        fs::read(&stdout)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The attributes of each `<tag …>` in `html`, as written (the tests look for some).
pub fn tags<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag} ");
    html.match_indices(&open)
        .filter_map(|(at, _)| {
            let rest = &html[at + open.len()..];
            rest.find('>').map(|end| &rest[..end])
        })
        .collect()
}
