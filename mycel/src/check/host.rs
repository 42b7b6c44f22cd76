//! `mycel check --pre`: whether this host can run mesh-node, checked the way mesh-node will use
//! it: the kernel, the cgroup v2 hierarchy its programs attach to, BPF itself (a map is
//! created and closed), the bpffs it pins in, its capabilities, its two ports, and the clock
//! that certificates are checked against.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
};

use mesh_daemon::host::{cgroup2_root, check_cgroup2};

use super::{Args, Finding};

/// tcx (the inbound programs' attachment) came in Linux 6.6.
const MIN_KERNEL: (u32, u32) = (6, 6);

pub fn check(args: &Args) -> Vec<Finding> {
    let mut out = vec![
        kernel(),
        cgroup(args),
        bpf(),
        bpffs(&args.bpffs),
        capabilities(),
        port("admin port", args.admin_listen, "--admin-listen"),
        port("metrics port", args.metrics_listen, "--metrics-listen"),
        clock(),
    ];
    out.extend(args.netns.iter().map(|netns| pod_ports(netns)));
    out
}

/// What mesh-node listens on in each enrolled pod: its outbound, plaintext and tunnel ports.
const POD_PORTS: [u16; 3] = [
    mesh_ebpf_common::OUTBOUND_PORT,
    mesh_ebpf_common::PLAINTEXT_PORT,
    mesh_ebpf_common::TUNNEL_PORT,
];

/// Whether mesh-node's ports are free in the pod whose netns is `netns`: each is bound (and
/// let go) from a thread inside it.
fn pod_ports(netns: &Path) -> Finding {
    let check = format!("ports in {}", netns.display());
    let taken = std::fs::File::open(netns).and_then(|ns| {
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on a descriptor we hold, in a thread of our own that ends here.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut taken = Vec::new();
                for port in POD_PORTS {
                    if let Err(e) = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))) {
                        taken.push(format!("{port}/tcp ({e})"));
                    }
                }
                let tunnel = SocketAddr::from(([0, 0, 0, 0], mesh_ebpf_common::TUNNEL_PORT));
                if let Err(e) = std::net::UdpSocket::bind(tunnel) {
                    taken.push(format!("{}/udp ({e})", mesh_ebpf_common::TUNNEL_PORT));
                }
                Ok(taken)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the check's thread panicked")))
        })
    });
    match taken {
        Ok(taken) if taken.is_empty() => Finding::ok(
            check,
            "15001, 15006 and 15008/tcp, 15008/udp are free for mesh-node",
        ),
        Ok(taken) => Finding::fail(
            check,
            format!("taken: {}", taken.join(", ")),
            "mesh-node listens there when it enrolls the pod: move the application off these ports (or exclude the pod from the mesh)",
        ),
        Err(e) => Finding::fail(
            check,
            format!("cannot enter it: {e}"),
            "give the path of the pod's network namespace (ip netns: /run/netns/NAME)",
        ),
    }
}

fn kernel() -> Finding {
    let release = match uname() {
        Some(r) => r,
        None => return Finding::fail("kernel", "uname failed", "run on Linux"),
    };
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= MIN_KERNEL {
        Finding::ok("kernel", format!("Linux {release}"))
    } else {
        Finding::fail(
            "kernel",
            format!(
                "Linux {release}, older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            format!(
                "mesh-node attaches tcx programs, which need Linux {}.{} or later: upgrade the kernel",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )
    }
}

fn uname() -> Option<String> {
    let u = nix::sys::utsname::uname().ok()?;
    Some(u.release().to_string_lossy().into_owned())
}

fn cgroup(args: &Args) -> Finding {
    let fix = "give mesh-node (and this check) --cgroup with a directory of the host's cgroup v2 hierarchy that holds the pods' processes";
    let path = match &args.cgroup {
        Some(p) => p.clone(),
        None => match cgroup2_root(Path::new("/proc/mounts")) {
            Ok(p) => p,
            Err(e) => return Finding::fail("cgroup v2", e.to_string(), fix),
        },
    };
    match check_cgroup2(&path) {
        Ok(()) => Finding::ok(
            "cgroup v2",
            format!(
                "{} is cgroup v2: mesh-node attaches there, and captures the processes in it and below",
                path.display()
            ),
        ),
        Err(e) => Finding::fail("cgroup v2", e.to_string(), fix),
    }
}

/// Creates a one-entry array map and closes it: BPF works here, for this user, under this
/// seccomp profile.
fn bpf() -> Finding {
    // The head of `union bpf_attr` for BPF_MAP_CREATE: map_type, key_size, value_size,
    // max_entries; the rest zero.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE = 0) reads `size` bytes of `attr`, which lives meanwhile.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Finding::fail(
            "BPF",
            format!("cannot create a BPF map: {e}"),
            "run mesh-node as root, or with CAP_BPF and CAP_PERFMON; in a container, a seccomp profile may forbid bpf(2)",
        );
    }
    // SAFETY: fd is the map's descriptor, ours alone.
    unsafe { libc::close(fd as i32) };
    Finding::ok("BPF", "a BPF map can be created here")
}

fn bpffs(path: &Path) -> Finding {
    match nix::sys::statfs::statfs(path) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => {
            Finding::ok("bpffs", format!("{} is a bpffs", path.display()))
        }
        _ => Finding::warn(
            "bpffs",
            format!("{} is not a bpffs", path.display()),
            format!(
                "mesh-node mounts one there itself outside Kubernetes; to keep pods captured across restarts it must be the host's: `mount -t bpf bpf {}`",
                path.display()
            ),
        ),
    }
}

/// What mesh-node needs, by bit of `CapEff`: the same list `deploy/` grants it.
const CAPABILITIES: [(u32, &str, &str); 5] = [
    (39, "CAP_BPF", "load the programs and read their maps"),
    (38, "CAP_PERFMON", "load the programs and read their maps"),
    (
        12,
        "CAP_NET_ADMIN",
        "attach cgroup and tcx programs, mark the proxy's sockets",
    ),
    (21, "CAP_SYS_ADMIN", "enter pods' network namespaces"),
    (
        19,
        "CAP_SYS_PTRACE",
        "find the netns of pods that started before it (Kubernetes)",
    ),
];

fn capabilities() -> Finding {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return Finding::fail(
            "capabilities",
            "cannot read CapEff in /proc/self/status",
            "run on Linux",
        );
    };
    let missing: Vec<String> = CAPABILITIES
        .iter()
        .filter(|(bit, _, _)| eff & (1 << bit) == 0)
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    if missing.is_empty() {
        Finding::ok(
            "capabilities",
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE",
        )
    } else {
        Finding::fail(
            "capabilities",
            format!("this process lacks {}", missing.join(", ")),
            "run mesh-node (and this check) as root, or grant those capabilities as deploy/base/mesh-node.yaml does",
        )
    }
}

fn port(check: &str, addr: SocketAddr, flag: &str) -> Finding {
    match TcpListener::bind(addr) {
        Ok(_) => Finding::ok(check, format!("{addr} is free")),
        Err(e) => Finding::fail(
            check,
            format!("cannot listen on {addr}: {e}"),
            format!("a mesh-node may run here already (`ss -ltnp 'sport = :{}'` says what holds it); else give mesh-node another {flag}", addr.port()),
        ),
    }
}

fn clock() -> Finding {
    // SAFETY: adjtimex with modes 0 only reads the kernel's clock state into `t`.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    if state < 0 {
        let e = std::io::Error::last_os_error();
        Finding::warn(
            "clock",
            format!("cannot ask the kernel whether the clock is synchronized: {e}"),
            "make sure an NTP client (chrony, systemd-timesyncd) runs: certificates are checked against the clock",
        )
    } else if state == libc::TIME_ERROR {
        Finding::warn(
            "clock",
            "the kernel says the clock is not synchronized",
            "run an NTP client (chrony, systemd-timesyncd): certificates are checked against the clock, and one that is off makes fresh certificates look not yet valid or expired",
        )
    } else {
        Finding::ok("clock", "synchronized")
    }
}
