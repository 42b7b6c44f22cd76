//! The kernel side of traffic capture, seen from user space: loads the embedded eBPF object,
//! attaches it once to a cgroup, and owns its maps.
//!
//! Dropping [`Capture`] detaches everything: the attachments are bpf_links held by this process,
//! so even a crash cannot leave them behind.

mod attach;
pub mod interfaces;
mod map_set;
mod own_cgroup;
#[cfg(test)]
mod test_run;

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        tc::{SchedClassifierLink, TcAttachOptions},
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use mesh_ebpf_common::{
    names, Counter, Enrollment, FastDenyKey, OrigDst, SockAddr, TupleKey, AF_INET, AF_INET6,
};

pub use attach::CgroupLock;
use map_set::MapSet;
pub use map_set::SetUpdate;
pub use own_cgroup::OwnCgroup;

/// The object built from `mesh-ebpf/programs` by the build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    #[error("cannot list the network interfaces: {0}")]
    Interfaces(std::io::Error),
    #[error("the capture programs were released (the daemon is shutting down)")]
    Released,
}

/// Sums of the per-CPU counters, in [`Counter::ALL`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Counter::COUNT as usize]);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

pub struct Options {
    pub cgroup: PathBuf,
    /// The daemon's own cgroup id: connects from it are the proxy's and are not redirected.
    pub proxy_cgroup: u64,
    pub orig_dst_capacity: u32,
    /// Enables the programs' aya-log output at debug level (off by default: the level check
    /// runs in the kernel, so disabled logging costs one load per call).
    pub ebpf_log: bool,
}

/// What one pass of [`Capture::attach_inbound`] did.
#[derive(Default)]
pub struct Attached {
    pub links: Vec<Inbound>,
    /// Interfaces it could not attach to (their names, as bytes), with why.
    pub failed: Vec<(Vec<u8>, String)>,
}

/// Sets the interface `name` of the calling thread's netns down, so that it takes no
/// traffic unpoliced; whether it could.
pub fn set_down(name: &[u8]) -> bool {
    link_type::set_down(name)
}

/// The inbound program on one of a pod's interfaces; dropping it detaches.
pub struct Inbound {
    pub ifindex: u32,
    pub name: String,
    /// Held for its drop.
    _link: SchedClassifierLink,
}

/// What kind of link an interface of the calling thread's netns is, and setting one down.
mod link_type {
    use std::os::fd::AsRawFd as _;

    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Ethernet,
        Loopback,
        /// Packets start at the IP header (tunnels, tun), or a kind this does not know.
        Other,
    }

    fn ifreq(name: &[u8]) -> Option<libc::ifreq> {
        // SAFETY: all-zero is a valid ifreq.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return None;
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        Some(req)
    }

    /// Any socket of the netns will do for the ioctls; none is bound.
    fn socket() -> Option<socket2::Socket> {
        let dgram = |d| socket2::Socket::new(d, socket2::Type::DGRAM, None);
        dgram(socket2::Domain::IPV4)
            .or_else(|_| dgram(socket2::Domain::IPV6))
            .ok()
    }

    /// The interface's hardware type, or `None` when it cannot be read (treated as `Other`:
    /// the L3 program judges from the IP header the kernel found, and drops what does not
    /// parse).
    pub fn of(name: &[u8]) -> Option<Kind> {
        let mut req = ifreq(name)?;
        let sock = socket()?;
        // SAFETY: SIOCGIFHWADDR reads the name and writes the hardware address into `req`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
            return None;
        }
        // SAFETY: the kernel filled the union's hwaddr member on success.
        Some(match unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } {
            ARPHRD_ETHER => Kind::Ethernet,
            ARPHRD_LOOPBACK => Kind::Loopback,
            _ => Kind::Other,
        })
    }

    pub fn exists(name: &str) -> bool {
        nix::net::if_::if_nametoindex(name).is_ok()
    }

    pub fn set_down(name: &[u8]) -> bool {
        ifreq(name).zip(socket()).is_some_and(|(mut req, sock)| {
            // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags member of `req`.
            unsafe {
                libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) == 0 && {
                    req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
                    libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) == 0
                }
            }
        })
    }
}

/// Loaded and attached programs plus their maps.
pub struct Capture {
    // Field order matters on drop: maps first, then the programs (which detach their links).
    enrolled: Mutex<HashMap<MapData, u64, Enrollment>>,
    fast_deny: Mutex<MapSet<FastDenyKey>>,
    open_ports: Mutex<MapSet<u16>>,
    inbound_mode: Mutex<Array<MapData, u32>>,
    by_tuple: HashMap<MapData, TupleKey, OrigDst>,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    /// Held for the inbound program, which is attached per pod interface as pods enroll;
    /// `None` once released. Dropping it detaches the cgroup programs.
    ebpf: Mutex<Option<Ebpf>>,
    /// The claim on the cgroup, after the programs in drop order; `None` once released.
    lock: Mutex<Option<CgroupLock>>,
    cgroup: PathBuf,
}

impl Capture {
    pub fn attach(opts: &Options) -> Result<Self, CaptureError> {
        let cgroup_dir = File::open(&opts.cgroup).map_err(|source| CaptureError::Cgroup {
            path: opts.cgroup.clone(),
            source,
        })?;
        let lock = attach::claim(&opts.cgroup, &cgroup_dir)?;

        let log_level: u8 = if opts.ebpf_log { 4 } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::ORIG_BY_COOKIE, opts.orig_dst_capacity)
            .map_max_entries(names::ORIG_BY_TUPLE, opts.orig_dst_capacity)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .override_global(
                mesh_ebpf_common::PROXY_CGROUP_GLOBAL,
                &opts.proxy_cgroup,
                true,
            )
            .load(OBJECT)?;
        if opts.ebpf_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_log_pump(logger),
                Err(e) => tracing::warn!(error = %e, "eBPF logging requested but unavailable"),
            }
        }

        for name in [
            names::CONNECT4,
            names::CONNECT6,
            names::GETPEERNAME4,
            names::GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?
                .try_into()
                .map_err(|source| CaptureError::Program { name, source })?;
            prog.load()
                .map_err(|source| CaptureError::Program { name, source })?;
            // bpf_links on a cgroup are always multi-attach; the kernel rejects any flag here.
            prog.attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|source| CaptureError::Program { name, source })?;
        }
        let name = names::SOCK_OPS;
        let prog: &mut SockOps = ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?
            .try_into()
            .map_err(|source| CaptureError::Program { name, source })?;
        prog.load()
            .map_err(|source| CaptureError::Program { name, source })?;
        prog.attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program { name, source })?;
        for name in [names::INBOUND, names::INBOUND_L3] {
            let inbound: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?
                .try_into()
                .map_err(|source| CaptureError::Program { name, source })?;
            inbound
                .load()
                .map_err(|source| CaptureError::Program { name, source })?;
        }

        let enrolled = take_map(&mut ebpf, names::ENROLLED, HashMap::try_from)?;
        let fast_deny = take_map(&mut ebpf, names::FAST_DENY, HashMap::try_from)?;
        let open_ports = take_map(&mut ebpf, names::OPEN_PORTS, HashMap::try_from)?;
        let inbound_mode = take_map(&mut ebpf, names::INBOUND_MODE, Array::try_from)?;
        let by_tuple = take_map(&mut ebpf, names::ORIG_BY_TUPLE, HashMap::try_from)?;
        let by_cookie = take_map(&mut ebpf, names::ORIG_BY_COOKIE, HashMap::try_from)?;
        let counters = take_map(&mut ebpf, names::COUNTERS, PerCpuArray::try_from)?;

        Ok(Self {
            enrolled: Mutex::new(enrolled),
            fast_deny: Mutex::new(MapSet::new(fast_deny)),
            open_ports: Mutex::new(MapSet::new(open_ports)),
            inbound_mode: Mutex::new(inbound_mode),
            by_tuple,
            by_cookie,
            counters,
            ebpf: Mutex::new(Some(ebpf)),
            lock: Mutex::new(Some(lock)),
            cgroup: opts.cgroup.clone(),
        })
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Detaches the cgroup programs, then removes the claim on the cgroup. For shutdown: tasks
    /// that still hold the capture keep working maps but redirect nothing new.
    pub fn release(&self) {
        drop(self.ebpf.lock().unwrap_or_else(|p| p.into_inner()).take());
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Starts redirecting connects made in the netns with this cookie.
    pub fn enroll(&self, netns_cookie: u64) -> Result<(), CaptureError> {
        self.enrolled_map()
            .insert(netns_cookie, Enrollment::default(), 0)
            .map_err(|source| CaptureError::Map {
                name: names::ENROLLED,
                source,
            })
    }

    /// Attaches the inbound program (tcx ingress) to every interface of the calling thread's
    /// netns but loopback that does not run it already: `mycel_inbound` where packets start
    /// with an Ethernet header, `mycel_inbound_l3` elsewhere. Whether an interface runs it is
    /// asked of the kernel, not of a list kept here, so an interface deleted and made again
    /// under the same index gets it again. An interface it cannot be attached to is named
    /// among the failures, for the caller to refuse the pod or set it down
    /// ([`set_down`]). Call it on the pod's netns thread; dropping the links detaches.
    pub fn attach_inbound(&self) -> Result<Attached, CaptureError> {
        let interfaces =
            nix::net::if_::if_nameindex().map_err(|e| CaptureError::Interfaces(e.into()))?;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = ebpf.as_mut().ok_or(CaptureError::Released)?;
        let ours = [names::INBOUND, names::INBOUND_L3].map(|name| {
            let prog: Option<&SchedClassifier> = ebpf.program(name).and_then(|p| p.try_into().ok());
            prog.and_then(|p| p.info().ok()).map(|i| i.id())
        });
        let mut out = Attached::default();
        for iface in interfaces.iter() {
            let raw = iface.name().to_bytes();
            let kind = link_type::of(raw);
            if kind == Some(link_type::Kind::Loopback) {
                continue;
            }
            let running = attach::tcx_ingress_programs(iface.index());
            if running
                .as_ref()
                .is_ok_and(|ids| ids.iter().any(|id| ours.contains(&Some(*id))))
            {
                continue;
            }
            let Ok(ifname) = std::str::from_utf8(raw) else {
                let why = "its name is not UTF-8, which the loader cannot attach by";
                out.failed.push((raw.to_vec(), why.into()));
                continue;
            };
            let name = if kind == Some(link_type::Kind::Ethernet) {
                names::INBOUND
            } else {
                names::INBOUND_L3
            };
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?
                .try_into()
                .map_err(|source| CaptureError::Program { name, source })?;
            let attach = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .and_then(|id| prog.take_link(id));
            match attach {
                Ok(link) => out.links.push(Inbound {
                    ifindex: iface.index(),
                    name: ifname.to_owned(),
                    _link: link,
                }),
                // Gone between the listing and the attach: nothing arrives on it any more.
                Err(_) if !link_type::exists(ifname) => {}
                Err(e) => out.failed.push((raw.to_vec(), e.to_string())),
            }
        }
        Ok(out)
    }

    /// What the inbound program does with plaintext to enrolled pods: `INBOUND_STRICT` or
    /// `INBOUND_PERMISSIVE` (anything else lets it through).
    pub fn set_inbound_mode(&self, mode: u32) -> Result<(), CaptureError> {
        self.inbound_mode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(0, mode, 0)
            .map_err(|source| CaptureError::Map {
                name: names::INBOUND_MODE,
                source,
            })
    }

    /// Makes the open-ports map hold exactly `ports`.
    pub fn set_open_ports(&self, ports: &HashSet<u16>) -> SetUpdate {
        self.open_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync(ports)
    }

    /// Stops redirecting new connects from this netns; open connections are not touched.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), CaptureError> {
        match self.enrolled_map().remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(CaptureError::Map {
                name: names::ENROLLED,
                source,
            }),
        }
    }

    fn enrolled_map(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, Enrollment>> {
        // A panic while holding this lock cannot leave the map half-written (each call is one
        // syscall), so a poisoned lock is still usable.
        self.enrolled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The destination the application connected to, for a connection the proxy accepted in
    /// the netns with `netns_cookie` from client address `peer`.
    pub fn original_destination(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey {
            netns_cookie,
            src: to_kernel(peer),
            _pad: 0,
        };
        let orig = self.by_tuple.get(&key, 0).ok()?;
        from_kernel(orig.dst)
    }

    pub fn counters(&self) -> Result<Counters, CaptureError> {
        let mut out = Counters::default();
        for c in Counter::ALL {
            let per_cpu =
                self.counters
                    .get(&(c as u32), 0)
                    .map_err(|source| CaptureError::Map {
                        name: names::COUNTERS,
                        source,
                    })?;
            out.0[c as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Makes the fast-deny map hold exactly `desired`. An entry that does not fit (the map is
    /// full) is left out and counted: the destination still refuses that connection, only later.
    pub fn set_fast_deny(&self, desired: &HashSet<FastDenyKey>) -> SetUpdate {
        self.fast_deny
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync(desired)
    }

    /// Entries the fast-deny map holds.
    pub fn fast_deny_entries(&self) -> usize {
        self.fast_deny
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Entries currently held by the two original-destination maps (by cookie, by tuple).
    pub fn orig_dst_entries(&self) -> (usize, usize) {
        (self.by_cookie.keys().count(), self.by_tuple.keys().count())
    }
}

/// The fast-deny key for a connect from the netns `netns_cookie` to `ip:port` (0: any port).
pub fn fast_deny_key(netns_cookie: u64, ip: IpAddr, port: u16) -> FastDenyKey {
    FastDenyKey {
        netns_cookie,
        dst: to_kernel(SocketAddr::new(ip, port)),
        _pad: 0,
    }
}

/// Moves the programs' aya-log records from their ring buffer into `tracing`.
fn spawn_log_pump(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the AsyncFd owns the logger, which owns the fd, so the fd outlives the
    // registration.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the eBPF log buffer");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, CaptureError> {
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    convert(map).map_err(|source| CaptureError::Map { name, source })
}

/// Socket address in the kernel programs' layout: network byte order, IPv4 in word 0.
pub fn to_kernel(addr: SocketAddr) -> SockAddr {
    let (addr_words, family) = match addr.ip() {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], AF_INET6)
        }
    };
    SockAddr {
        addr: addr_words,
        port: addr.port().to_be(),
        family,
    }
}

/// The inverse of [`to_kernel`]; an IPv4-mapped IPv6 destination comes back as IPv4, since
/// that is where the application's packets would have gone.
pub fn from_kernel(sa: SockAddr) -> Option<SocketAddr> {
    let port = u16::from_be(sa.port);
    let ip = match sa.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(sa.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in sa.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(o);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_layout_round_trips() {
        for s in ["10.1.2.3:8080", "[fd00::1:2]:443", "127.0.0.1:1"] {
            let addr: SocketAddr = s.parse().unwrap();
            assert_eq!(from_kernel(to_kernel(addr)), Some(addr));
        }
    }

    #[test]
    fn kernel_layout_is_network_order() {
        let sa = to_kernel("10.0.0.1:15001".parse().unwrap());
        assert_eq!(sa.addr[0].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(sa.port.to_ne_bytes(), 15001u16.to_be_bytes());
    }

    #[test]
    fn mapped_v6_destination_becomes_v4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:80".parse().unwrap();
        assert_eq!(
            from_kernel(to_kernel(mapped)),
            Some("10.0.0.7:80".parse().unwrap())
        );
    }

    #[test]
    fn unknown_family_is_rejected() {
        let sa = SockAddr {
            family: 99,
            ..SockAddr::default()
        };
        assert_eq!(from_kernel(sa), None);
    }
}
