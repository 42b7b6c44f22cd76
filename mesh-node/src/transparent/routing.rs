//! What a pod's netns gets so that the application's answers to the proxy's transparent
//! sockets come back to them: one rule and one route per family, and three sysctls. These
//! functions run on the pod's netns thread.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::netlink::{self, Op};
use super::{Families, MARK, PRIORITY, TABLE};

/// The sysctls turned on (relative to the sysctl directory), each with its flag in the pod's
/// `ENROLLED` entry, which says that it was off before. The IPv6 one is missing where the
/// netns has no IPv6.
/// - `tcp_fwmark_accept` (both families): a socket the application accepts takes the mark of
///   the SYN that made it, so its SYN-ACK and all after it are routed by the rule;
/// - `fwmark_reflect`: what the kernel answers for no socket (the reset for a closed port, an
///   ICMP error) takes the mark of the packet it answers, so the proxy learns at once that
///   nothing listens rather than at its connect timeout.
///
/// Packets from anywhere else carry no mark, so nothing changes for them.
const SYSCTLS: [(&str, u32); 3] = [
    (
        "ipv4/tcp_fwmark_accept",
        mesh_ebpf_common::ENROLLED_ACCEPT_MARK_SET,
    ),
    (
        "ipv4/fwmark_reflect",
        mesh_ebpf_common::ENROLLED_REFLECT_V4_SET,
    ),
    (
        "ipv6/fwmark_reflect",
        mesh_ebpf_common::ENROLLED_REFLECT_V6_SET,
    ),
];
/// The one that a netns without IPv6 lacks.
const IPV6_ONLY: u32 = mesh_ebpf_common::ENROLLED_REFLECT_V6_SET;

#[derive(Debug, thiserror::Error)]
pub enum SetUpError {
    #[error("cannot add the return rule and route for marked sockets: {0}")]
    Route(io::Error),
    #[error("cannot turn {path} on: {source} (in a container, mount the host's /proc/sys/net writable and name it with --net-sysctl-dir)")]
    Sysctl { path: PathBuf, source: io::Error },
    #[error("cannot record the sysctls turned on: {0}")]
    Record(String),
    #[error("the netns has no loopback interface: {0}")]
    NoLoopback(io::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// Adds the rules, routes and sysctls to the calling thread's netns; `sysctl_dir` is where
/// its `/proc/sys/net` is. What is there already (a
/// pod an earlier daemon enrolled) is kept as it is. IPv4 is required; IPv6 is routed where
/// the netns has it (a failure there leaves IPv6 connections from the pod's own address).
/// `record` is given the sysctls about to be turned on before they are, so that whoever tears
/// down knows. On an error nothing this call added is left.
pub fn set_up(
    sysctl_dir: &Path,
    record: impl FnOnce(u32) -> Result<(), String>,
) -> Result<Families, SetUpError> {
    let lo = loopback().map_err(SetUpError::NoLoopback)?;
    let v4 = add_family(libc::AF_INET as u8, lo).map_err(SetUpError::Route)?;
    let v6 = match add_family(libc::AF_INET6 as u8, lo) {
        Ok(added) => Some(added),
        // No IPv6 in the netns (the kernel has none, or `disable_ipv6`).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EACCES)) => {
            tracing::debug!(error = %e, "no return routing for IPv6");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "no return routing for IPv6: applications see IPv6 connections from the pod's own address");
            None
        }
    };
    let undo = |v4: Added, v6: Option<Added>| {
        v4.undo(libc::AF_INET as u8, lo);
        if let Some(v6) = v6 {
            v6.undo(libc::AF_INET6 as u8, lo);
        }
    };
    let mut off = 0;
    for (name, flag) in SYSCTLS {
        let path = sysctl_dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(value) if value.trim() == "1" => {}
            Ok(_) => off |= flag,
            Err(e) if flag == IPV6_ONLY && v6.is_none() && e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                undo(v4, v6);
                return Err(SetUpError::Sysctl { path, source });
            }
        }
    }
    if off != 0 {
        if let Err(e) = record(off) {
            undo(v4, v6);
            return Err(SetUpError::Record(e));
        }
    }
    let mut turned_on = 0;
    for (name, flag) in SYSCTLS {
        if off & flag == 0 {
            continue;
        }
        let path = sysctl_dir.join(name);
        if let Err(source) = std::fs::write(&path, "1") {
            restore(sysctl_dir, turned_on);
            undo(v4, v6);
            return Err(SetUpError::Sysctl { path, source });
        }
        turned_on |= flag;
    }
    Ok(Families {
        v4: true,
        v6: v6.is_some(),
    })
}

/// Removes the rules and routes from the calling thread's netns, and turns off again the
/// sysctls in `turned_on` (`ENROLLED_*` flags: they were off before the pod joined). What is
/// already gone is no error; anything else is logged.
pub fn tear_down(sysctl_dir: &Path, turned_on: u32) {
    if let Ok(lo) = loopback() {
        remove_family(libc::AF_INET as u8, lo);
        remove_family(libc::AF_INET6 as u8, lo);
    }
    restore(sysctl_dir, turned_on);
}

fn restore(sysctl_dir: &Path, turned_on: u32) {
    for (name, flag) in SYSCTLS {
        if turned_on & flag != 0 {
            let path = sysctl_dir.join(name);
            if let Err(e) = std::fs::write(&path, "0") {
                tracing::warn!(path = %path.display(), error = %e, "cannot turn a sysctl off again");
            }
        }
    }
}

fn loopback() -> io::Result<u32> {
    nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)
}

/// Which of a family's two objects this call made (and so may take away again).
#[derive(Clone, Copy)]
struct Added {
    rule: bool,
    route: bool,
}

impl Added {
    fn undo(self, family: u8, lo: u32) {
        if self.route {
            let _ = netlink::local_default_route(Op::Delete, family, lo, TABLE);
        }
        if self.rule {
            let _ = netlink::rule(Op::Delete, family, MARK, TABLE, PRIORITY);
        }
    }
}

fn add_family(family: u8, lo: u32) -> io::Result<Added> {
    // Made now (true), there already (false), or failed.
    let made = |r: io::Result<()>| match r {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    };
    let rule = made(netlink::rule(Op::Add, family, MARK, TABLE, PRIORITY))?;
    match made(netlink::local_default_route(Op::Add, family, lo, TABLE)) {
        Ok(route) => Ok(Added { rule, route }),
        Err(e) => {
            Added { rule, route: false }.undo(family, lo);
            Err(e)
        }
    }
}

fn remove_family(family: u8, lo: u32) {
    let gone = |r: io::Result<()>, what: &str| match r {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
            ) => {}
        Err(e) => tracing::warn!(error = %e, family, "cannot remove the return {what}"),
    };
    gone(
        netlink::local_default_route(Op::Delete, family, lo, TABLE),
        "route",
    );
    gone(
        netlink::rule(Op::Delete, family, MARK, TABLE, PRIORITY),
        "rule",
    );
}
