//! A small cluster made of network namespaces on this machine.
//!
//! ```text
//!   pod netns (eth0) ──veth── node netns (br0, uplink) ──veth── fabric netns (br0) ── other nodes
//! ```
//!
//! Pods of node `i` live in `10.77.i.0/24` and `fd77:0:0:i::/64`; nodes join a fabric bridge on
//! `10.78.0.0/24` / `fd78::/64` and route to each other's pod subnets. Nothing is created in the
//! host's own namespace, and no namespace has a route beyond these subnets, so no packet can
//! leave. Each pod's processes run in their own cgroup below their node's cgroup under the
//! cgroup v2 mount. Everything carries one unique prefix and is removed on drop, even during a
//! panic; [`clean_prefix`] removes what a killed run left.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Every Mycel topology name starts with this, so leftovers can be found and removed.
pub const PREFIX: &str = "mycel-";
/// A node's interface to the fabric that joins the nodes (not "up": `ip link add up` reads
/// that as a flag).
pub const UPLINK: &str = "uplink";
/// Prefix of topologies made by tests; `cargo xtask up` uses `mycel-up`.
pub const TEST_PREFIX: &str = "mycel-t";

pub struct PodSpec {
    pub name: String,
}

pub struct NodeSpec {
    pub name: String,
    pub pods: Vec<PodSpec>,
}

impl NodeSpec {
    pub fn new(name: &str, pods: &[&str]) -> Self {
        Self {
            name: name.into(),
            pods: pods.iter().map(|p| PodSpec { name: (*p).into() }).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    /// Name under /run/netns.
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The bpffs mesh-node pins in (`--bpffs`): the topology's own, so that tests running at
    /// once never share pins and whatever a test leaves pinned goes when it is unmounted.
    pub bpffs: PathBuf,
    pub pods: Vec<Pod>,
}

pub struct Topology {
    pub prefix: String,
    pub cgroup_root: PathBuf,
    /// A bpffs mounted for this topology alone, unmounted on drop.
    pub bpffs: PathBuf,
    pub nodes: Vec<Node>,
    /// Namespaces created so far, deleted in reverse order on drop.
    namespaces: Vec<String>,
    /// Cgroups created so far (parents before children), removed in reverse order on drop.
    cgroups: Vec<PathBuf>,
}

#[derive(Debug)]
pub struct TopologyError(pub String);

impl std::fmt::Display for TopologyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for TopologyError {}

type Result<T> = std::result::Result<T, TopologyError>;

fn err(msg: impl Into<String>) -> TopologyError {
    TopologyError(msg.into())
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(|e| err(format!("/proc/mounts: {e}")))?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| err("no cgroup2 mount in /proc/mounts"))
}

fn unique_prefix(base: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id().wrapping_mul(2_654_435_761)
        ^ nanos
        ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503);
    format!("{base}{:06x}", mix & 0xff_ffff)
}

/// Runs `ip` (iproute2) with the given arguments and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs `program` with `args` and fails with its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| err(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Unmounts the bpffs at `path` (its pins go with it) and removes the directory.
fn remove_bpffs(path: &Path) -> Result<()> {
    let mounted = fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*path.to_string_lossy()));
    if mounted {
        run("umount", &[&path.to_string_lossy()])?;
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("rmdir {}: {e}", path.display()))),
    }
}

/// Sets a sysctl inside a netns (a short-lived `ip netns exec`, which is fine for /proc/sys).
fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    ip(&[
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
}

/// Gives `dev` in `netns` an IPv4 and an IPv6 address (IPv6 without duplicate address
/// detection, which would leave it unusable for a second or two).
fn add_addrs(netns: &str, dev: &str, v4_cidr: &str, v6_cidr: &str) -> Result<()> {
    ip(&["-n", netns, "addr", "add", v4_cidr, "dev", dev])?;
    ip(&["-n", netns, "addr", "add", v6_cidr, "dev", dev, "nodad"])
}

impl Topology {
    /// Builds the topology; on any failure everything created so far is removed.
    pub fn new(nodes: &[NodeSpec]) -> Result<Self> {
        Self::with_prefix(TEST_PREFIX, nodes)
    }

    /// Like [`Topology::new`], with names starting with `base` (which must start with
    /// [`PREFIX`] so `cargo xtask clean` finds it).
    pub fn with_prefix(base: &str, nodes: &[NodeSpec]) -> Result<Self> {
        if !base.starts_with(PREFIX) {
            return Err(err(format!(
                "topology prefix {base:?} must start with {PREFIX:?}"
            )));
        }
        let prefix = unique_prefix(base);
        let cgroup_root = cgroup2_mount()?.join(&prefix);
        let bpffs = std::env::temp_dir().join(format!("{prefix}-bpffs"));
        fs::create_dir(&bpffs).map_err(|e| err(format!("mkdir {}: {e}", bpffs.display())))?;
        let mut topo = Topology {
            prefix,
            cgroup_root,
            bpffs,
            nodes: Vec::new(),
            namespaces: Vec::new(),
            cgroups: Vec::new(),
        };
        // On error, `topo` is dropped and tears down what exists.
        run(
            "mount",
            &["-t", "bpf", "bpf", &topo.bpffs.to_string_lossy()],
        )?;
        topo.build(nodes)?;
        Ok(topo)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        // No duplicate address detection on the interfaces made here, their link-local
        // addresses included: while a link-local address is tentative the kernel sends no
        // neighbour solicitation from it, so the first IPv6 packets between two nodes could
        // find their next hop unresolved and be dropped for seconds.
        sysctl(name, "net.ipv6.conf.default.accept_dad", "0")?;
        sysctl(name, "net.ipv6.conf.all.accept_dad", "0")?;
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn add_cgroup(&mut self, path: &Path) -> Result<()> {
        fs::create_dir(path).map_err(|e| err(format!("mkdir {}: {e}", path.display())))?;
        self.cgroups.push(path.to_path_buf());
        Ok(())
    }

    fn build(&mut self, specs: &[NodeSpec]) -> Result<()> {
        if specs.len() > 200 {
            return Err(err("at most 200 nodes"));
        }
        let root = self.cgroup_root.clone();
        self.add_cgroup(&root)?;
        let fabric = format!("{}-fabric", self.prefix);
        if specs.len() > 1 {
            self.add_netns(&fabric)?;
            ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        }
        for (n, spec) in specs.iter().enumerate() {
            if spec.pods.len() > 250 {
                return Err(err("at most 250 pods per node"));
            }
            let node_ns = format!("{}-{}", self.prefix, spec.name);
            self.add_netns(&node_ns)?;
            for (k, v) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ] {
                sysctl(&node_ns, k, v)?;
            }
            ip(&["-n", &node_ns, "link", "add", "br0", "type", "bridge"])?;
            add_addrs(
                &node_ns,
                "br0",
                &format!("10.77.{n}.1/24"),
                &format!("fd77:0:0:{n}::1/64"),
            )?;
            ip(&["-n", &node_ns, "link", "set", "br0", "up"])?;
            if specs.len() > 1 {
                let up = format!("n{n}");
                ip(&[
                    "-n", &node_ns, "link", "add", UPLINK, "type", "veth", "peer", "name", &up,
                    "netns", &fabric,
                ])?;
                ip(&["-n", &fabric, "link", "set", &up, "master", "br0", "up"])?;
                add_addrs(
                    &node_ns,
                    UPLINK,
                    &format!("10.78.0.{}/24", n + 1),
                    &format!("fd78::{}/64", n + 1),
                )?;
                ip(&["-n", &node_ns, "link", "set", UPLINK, "up"])?;
                for m in (0..specs.len()).filter(|m| *m != n) {
                    ip(&[
                        "-n",
                        &node_ns,
                        "route",
                        "add",
                        &format!("10.77.{m}.0/24"),
                        "via",
                        &format!("10.78.0.{}", m + 1),
                    ])?;
                    ip(&[
                        "-n",
                        &node_ns,
                        "-6",
                        "route",
                        "add",
                        &format!("fd77:0:0:{m}::/64"),
                        "via",
                        &format!("fd78::{}", m + 1),
                    ])?;
                }
            }
            let node_cg = self.cgroup_root.join(&spec.name);
            self.add_cgroup(&node_cg)?;
            let mut node = Node {
                name: spec.name.clone(),
                netns: node_ns.clone(),
                cgroup: node_cg.clone(),
                bpffs: self.bpffs.clone(),
                pods: Vec::new(),
            };
            for (p, pod) in spec.pods.iter().enumerate() {
                let pod_ns = format!("{}-{}-{}", self.prefix, spec.name, pod.name);
                self.add_netns(&pod_ns)?;
                let host_if = format!("p{p}");
                ip(&[
                    "-n", &node_ns, "link", "add", &host_if, "type", "veth", "peer", "name",
                    "eth0", "netns", &pod_ns,
                ])?;
                ip(&[
                    "-n", &node_ns, "link", "set", &host_if, "master", "br0", "up",
                ])?;
                let v4 = Ipv4Addr::new(10, 77, n as u8, p as u8 + 2);
                let v6: Ipv6Addr = format!("fd77:0:0:{n}::{:x}", p + 2)
                    .parse()
                    .map_err(|e| err(format!("ipv6: {e}")))?;
                add_addrs(&pod_ns, "eth0", &format!("{v4}/24"), &format!("{v6}/64"))?;
                ip(&["-n", &pod_ns, "link", "set", "eth0", "up"])?;
                // Only the mesh's own subnets are routable: there is no default route.
                ip(&[
                    "-n",
                    &pod_ns,
                    "route",
                    "add",
                    "10.77.0.0/16",
                    "via",
                    &format!("10.77.{n}.1"),
                ])?;
                ip(&[
                    "-n",
                    &pod_ns,
                    "-6",
                    "route",
                    "add",
                    "fd77::/16",
                    "via",
                    &format!("fd77:0:0:{n}::1"),
                ])?;
                let pod_cg = node_cg.join(&pod.name);
                self.add_cgroup(&pod_cg)?;
                node.pods.push(Pod {
                    name: pod.name.clone(),
                    node: spec.name.clone(),
                    netns: pod_ns,
                    cgroup: pod_cg,
                    ipv4: v4,
                    ipv6: v6,
                });
            }
            self.nodes.push(node);
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this topology"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this topology"))
    }

    /// Adds a network namespace `<prefix>-<name>` with only its loopback, up: nothing in it
    /// reaches anything outside (a browser under test, say); removed on drop. Returns its path.
    pub fn add_isolated_netns(&mut self, name: &str) -> Result<PathBuf> {
        let ns = format!("{}-{name}", self.prefix);
        self.add_netns(&ns)?;
        Ok(PathBuf::from("/run/netns").join(ns))
    }

    /// Adds a cgroup below `parent` (for processes that share a pod's netns but not its cgroup,
    /// or for the daemon itself); removed on drop.
    pub fn add_cgroup_below(&mut self, parent: &Path, name: &str) -> Result<PathBuf> {
        let path = parent.join(name);
        self.add_cgroup(&path)?;
        Ok(path)
    }
}

/// Starts `cmd` inside the netns at `netns_path` and/or in `cgroup`, each when given; the
/// caller's own namespace and cgroup are untouched (no `ip netns exec`, which remounts /sys).
pub fn spawn_in(
    netns_path: Option<&Path>,
    cgroup: Option<&Path>,
    cmd: &mut Command,
) -> io::Result<Child> {
    let ns = netns_path.map(File::open).transpose()?;
    let procs = match cgroup {
        Some(cg) => Some(
            OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))?,
        ),
        None => None,
    };
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(ns);
    drop(procs);
    child
}

impl Pod {
    /// Starts a process in this pod (its netns and its cgroup).
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        spawn_in(Some(&self.netns_path()), Some(&self.cgroup), cmd)
    }

    /// Runs a command in this pod and collects its output, killing it after `timeout`.
    pub fn run(&self, cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
        run_with_timeout(
            self.spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?,
            timeout,
        )
    }
}

/// Waits for `child` and collects its output; kills it once `timeout` has passed.
pub fn run_with_timeout(mut child: Child, timeout: Duration) -> io::Result<Output> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "command did not finish within {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kills every process in the cgroup and removes it. Leaves nothing on success.
fn remove_cgroup(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) kills the whole subtree atomically.
    if let Ok(mut f) = OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
    {
        let _ = f.write_all(b"1");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn remove_cgroup_tree(path: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    remove_cgroup(path)
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        // Deepest first; a subtree created outside the bookkeeping is handled by the tree walk.
        if let Err(e) = remove_cgroup_tree(&self.cgroup_root) {
            problems.push(format!("cgroup {}: {e}", self.cgroup_root.display()));
        }
        // After the processes: the pins in it detach the programs from the pods.
        if let Err(e) = remove_bpffs(&self.bpffs) {
            problems.push(e.0);
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                problems.push(e.0);
            }
        }
        self.cgroups.clear();
        if !problems.is_empty() {
            eprintln!(
                "topology {}: teardown left: {}",
                self.prefix,
                problems.join("; ")
            );
        }
    }
}

/// What [`clean_prefix`] removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub namespaces: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    pub bpffs: Vec<PathBuf>,
}

/// Removes every namespace and cgroup whose name starts with `prefix` (leftovers of runs that
/// were killed before their `Drop` ran).
pub fn clean_prefix(prefix: &str) -> Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    if let Ok(root) = cgroup2_mount() {
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with(prefix) && e.path().is_dir() {
                    remove_cgroup_tree(&e.path())
                        .map_err(|x| err(format!("cgroup {}: {x}", e.path().display())))?;
                    cleaned.cgroups.push(e.path());
                }
            }
        }
    }
    let tmp = std::env::temp_dir();
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dir), Some(fstype)) = (f.get(1), f.get(2)) else {
            continue;
        };
        let path = Path::new(dir);
        let ours = path.parent() == Some(tmp.as_path())
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix));
        if *fstype == "bpf" && ours {
            remove_bpffs(path)?;
            cleaned.bpffs.push(path.to_path_buf());
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        for n in names.into_iter().rev() {
            ip(&["netns", "del", &n])?;
            cleaned.namespaces.push(n);
        }
    }
    Ok(cleaned)
}
