//! The kernel side of traffic capture, seen from user space: loads the embedded eBPF object,
//! attaches it to a cgroup and to the pods' interfaces, and owns its maps.
//!
//! Maps and links are pinned (`pins.rs`) and outlive the process: a daemon that stops or
//! crashes leaves its pods captured and policed, fail closed, and the next one takes the
//! links over in place (`links.rs`) with the maps as they are, or carried over from an older
//! layout (`layout.rs`). `mesh-node uninstall` removes them.

mod attach;
mod hop;
pub mod interfaces;
mod layout;
mod links;
mod map_set;
mod own_cgroup;
pub mod pins;
mod sys;
#[cfg(test)]
mod test_run;

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupSockAddr, Program, SchedClassifier, SockOps},
    Ebpf, EbpfLoader,
};
use mesh_ebpf_common::{
    names, Counter, Enrollment, FastDenyKey, OrigDst, SockAddr, TupleKey, AF_INET, AF_INET6,
};

pub use attach::CgroupLock;
pub use hop::HopError;
use layout::Layout;
pub use layout::LayoutError;
use map_set::MapSet;
pub use map_set::SetUpdate;
pub use own_cgroup::OwnCgroup;
use pins::{PinError, Pins, TcxKind};

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
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "a mesh-node for node {node} runs in cgroup {cgroup} (it uses these pins); stop it first"
    )]
    DaemonRuns { node: String, cgroup: PathBuf },
    #[error("Mycel programs are still attached to {0} five seconds after their pins went; run uninstall again")]
    StillAttached(PathBuf),
    #[error("cannot take over or attach the link of {program} at {path}: {source}")]
    Link {
        program: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
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
    /// The bpffs the maps and links are pinned in.
    pub bpffs: PathBuf,
    /// Whether to mount a bpffs at `bpffs` when there is none (not in a container).
    pub mount_bpffs: bool,
    /// This node's name: its pins are under `<bpffs>/mycel/<node>/`.
    pub node: String,
    /// The daemon's own cgroup id: connects from it are the proxy's and are not redirected.
    pub proxy_cgroup: u64,
    pub orig_dst_capacity: u32,
    /// The cgroup lock handed over by the daemon this one takes over from (else it is taken).
    pub handed_lock: Option<File>,
    /// That daemon's cgroup id: its connects stay exempt while it drains.
    pub draining_daemon: Option<u64>,
    /// Enables the programs' aya-log output at debug level (off by default: the level check
    /// runs in the kernel, so disabled logging costs one load per call).
    pub ebpf_log: bool,
    /// The daemon's own cgroup directory. `sock_ops` runs there too, for the proxy's sockets
    /// of the pod-local hop, when it lies beside `cgroup` (`hop.rs` says when it must not).
    pub own_cgroup: Option<PathBuf>,
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

/// An interface of a pod the inbound program was attached to (its link is pinned).
pub struct Inbound {
    pub ifindex: u32,
    pub name: String,
}

/// What [`Capture::attach`] found and did, for the start-up log.
#[derive(Debug, Default)]
pub struct Takeover {
    /// The maps were pinned by an earlier daemon of this build's layout and kept as they are.
    pub adopted_maps: bool,
    /// Maps carried over from an older layout, with their entry counts.
    pub carried_over: Vec<(&'static str, u32)>,
    /// Cgroup links taken over in place (never detached).
    pub links_updated: usize,
    /// Cgroup links made (first start) or made again (a defunct one, or another cgroup).
    pub links_attached: usize,
    /// Of those, links made in place of an earlier daemon's.
    pub links_replaced: usize,
    /// Pods' inbound links taken over in place.
    pub inbound_updated: usize,
    /// Pods whose netns went while no daemon ran: their pins and enrollment removed.
    pub pods_gone: usize,
}

/// The cgroup programs with their attach types (the kernel's numbering).
const CGROUP_PROGRAMS: [(&str, u32); 5] = [
    (names::CONNECT4, 10),
    (names::CONNECT6, 11),
    (names::GETPEERNAME4, 29),
    (names::GETPEERNAME6, 30),
    (names::SOCK_OPS, 3),
];

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

    pub fn exists(name: &[u8]) -> bool {
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
    enrolled: Mutex<HashMap<MapData, u64, Enrollment>>,
    fast_deny: Mutex<MapSet<FastDenyKey>>,
    open_ports: Mutex<MapSet<u16>>,
    inbound_mode: Mutex<Array<MapData, u32>>,
    by_tuple: HashMap<MapData, TupleKey, OrigDst>,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    /// The loaded programs, for the inbound program's attachments as pods enroll; `None` once
    /// released. The links hold the programs they run, so dropping this detaches nothing.
    ebpf: Mutex<Option<Ebpf>>,
    /// The claim on the cgroup; `None` once released.
    lock: Mutex<Option<CgroupLock>>,
    /// The cgroup ids whose connects are the proxy's own.
    proxy_cgroups: Mutex<HashMap<MapData, u64, u32>>,
    /// The pod-local hop through the socket map.
    hop: hop::LocalHop,
    pins: Pins,
    cgroup: PathBuf,
    takeover: Takeover,
    layout: String,
}

impl Capture {
    /// Loads the programs, then makes the pinned links run them: taken over in place from an
    /// earlier daemon (never detached), or attached and pinned on a first start.
    pub fn attach(opts: &Options) -> Result<Self, CaptureError> {
        let cgroup_dir = File::open(&opts.cgroup).map_err(|source| CaptureError::Cgroup {
            path: opts.cgroup.clone(),
            source,
        })?;
        let cgroup_id = cgroup_dir
            .metadata()
            .map_err(|source| CaptureError::Cgroup {
                path: opts.cgroup.clone(),
                source,
            })?
            .ino();
        let lock = match &opts.handed_lock {
            Some(file) => {
                let file = file.try_clone().map_err(|source| CaptureError::Cgroup {
                    path: opts.cgroup.clone(),
                    source,
                })?;
                CgroupLock::adopt(&opts.cgroup, &cgroup_dir, file)?
            }
            None => attach::claim(&opts.cgroup, &cgroup_dir)?,
        };
        let pins = Pins::open(&opts.bpffs, &opts.node, opts.mount_bpffs)?;
        let layout = Layout::of(OBJECT, opts.orig_dst_capacity)?;
        let maps_dir = pins.maps_dir(&layout.name);
        let mut takeover = Takeover {
            adopted_maps: maps_dir.is_dir(),
            ..Takeover::default()
        };
        if takeover.adopted_maps {
            layout.check(&maps_dir)?;
        }
        std::fs::create_dir_all(&maps_dir).map_err(|source| PinError::Create {
            path: maps_dir.clone(),
            source,
        })?;

        let log_level: u8 = if opts.ebpf_log { 4 } else { 0 };
        let mut loader = EbpfLoader::new();
        let hop_capacity = layout::hop_capacity(opts.orig_dst_capacity);
        loader
            .map_max_entries(names::ORIG_BY_COOKIE, opts.orig_dst_capacity)
            .map_max_entries(names::ORIG_BY_TUPLE, opts.orig_dst_capacity)
            .map_max_entries(names::HOP_SOCKS, hop_capacity)
            .map_max_entries(names::HOP_STATE, hop_capacity)
            .override_global("AYA_LOG_LEVEL", &log_level, false);
        for name in layout::PINNED {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader.load(OBJECT)?;
        if opts.ebpf_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_log_pump(logger),
                Err(e) => tracing::warn!(error = %e, "eBPF logging requested but unavailable"),
            }
        }
        load_programs(&mut ebpf)?;

        let older = pins.other_map_dirs(&layout.name)?;
        for dir in &older {
            takeover
                .carried_over
                .extend(layout.carry_over(dir, &maps_dir));
        }
        let mut proxy_cgroups: HashMap<MapData, u64, u32> =
            take_map(&mut ebpf, names::PROXY_CGROUPS, HashMap::try_from)?;
        let map_err = |name| move |source| CaptureError::Map { name, source };
        let stale: Vec<u64> = proxy_cgroups
            .keys()
            .filter_map(Result::ok)
            .filter(|id| *id != opts.proxy_cgroup && Some(*id) != opts.draining_daemon)
            .collect();
        proxy_cgroups
            .insert(opts.proxy_cgroup, 1, 0)
            .map_err(map_err(names::PROXY_CGROUPS))?;
        if let Some(draining) = opts.draining_daemon {
            proxy_cgroups
                .insert(draining, 1, 0)
                .map_err(map_err(names::PROXY_CGROUPS))?;
        }
        // No other daemon runs (the cgroup lock says so; one that handed over drains): the
        // cgroups of earlier ones are exempt no more.
        for id in stale {
            let _ = proxy_cgroups.remove(&id);
        }

        // Before `sock_ops` runs this build's program: a socket takes its send hook from the
        // map when it joins.
        let hop_link = hop::take_link(&mut ebpf, &pins);
        let mut ours = Vec::new();
        for (name, attach_type) in CGROUP_PROGRAMS {
            let prog = ebpf.program(name).ok_or(CaptureError::Missing(name))?;
            let fd = program_fd(prog, name)?;
            let taken = links::take_cgroup_link(
                &pins,
                name,
                fd.as_fd(),
                &cgroup_dir,
                cgroup_id,
                attach_type,
            )
            .map_err(|source| CaptureError::Link {
                program: name,
                path: pins.cgroup_link(name),
                source,
            })?;
            match taken {
                links::Taken::Updated => takeover.links_updated += 1,
                links::Taken::Attached => takeover.links_attached += 1,
                links::Taken::Replaced => {
                    takeover.links_attached += 1;
                    takeover.links_replaced += 1;
                }
            }
            // Without its id, the attachment just taken over would be taken for a stale one
            // and detached.
            let info = prog
                .info()
                .map_err(|source| CaptureError::Program { name, source })?;
            ours.push(info.id());
        }
        let inbound = {
            let eth = ebpf
                .program(names::INBOUND)
                .ok_or(CaptureError::Missing(names::INBOUND))?;
            let l3 = ebpf
                .program(names::INBOUND_L3)
                .ok_or(CaptureError::Missing(names::INBOUND_L3))?;
            let (eth, l3) = (
                program_fd(eth, names::INBOUND)?,
                program_fd(l3, names::INBOUND_L3)?,
            );
            links::take_inbound_links(&pins, eth.as_fd(), l3.as_fd())?
        };
        takeover.inbound_updated = inbound.updated;
        // Attachments of Mycel programs that are not these (made outside these pins).
        attach::remove_stale(&opts.cgroup, &cgroup_dir, &ours)?;
        for dir in &older {
            pins.remove_maps(dir)?;
        }

        // A pod whose interfaces all went keeps its ENROLLED entry: its netns is most likely
        // gone too (and a cookie is never reused), but if it is not, its connects must stay
        // captured. The first complete set lets it go (`keep_only_enrolled`).
        takeover.pods_gone = inbound.pods_gone.len();
        let enrolled: HashMap<MapData, u64, Enrollment> =
            take_map(&mut ebpf, names::ENROLLED, HashMap::try_from)?;
        let fast_deny = take_map(&mut ebpf, names::FAST_DENY, HashMap::try_from)?;
        let open_ports = take_map(&mut ebpf, names::OPEN_PORTS, HashMap::try_from)?;
        let inbound_mode = take_map(&mut ebpf, names::INBOUND_MODE, Array::try_from)?;
        let by_tuple = take_map(&mut ebpf, names::ORIG_BY_TUPLE, HashMap::try_from)?;
        let by_cookie = take_map(&mut ebpf, names::ORIG_BY_COOKIE, HashMap::try_from)?;
        let counters = take_map(&mut ebpf, names::COUNTERS, PerCpuArray::try_from)?;
        let local_hop = take_map(&mut ebpf, names::LOCAL_HOP, Array::try_from)?;
        let hop = hop::LocalHop::new(
            local_hop,
            hop_link,
            &ebpf,
            opts.own_cgroup.as_deref(),
            &opts.cgroup,
        );

        Ok(Self {
            enrolled: Mutex::new(enrolled),
            fast_deny: Mutex::new(MapSet::adopt(fast_deny)),
            open_ports: Mutex::new(MapSet::adopt(open_ports)),
            inbound_mode: Mutex::new(inbound_mode),
            by_tuple,
            by_cookie,
            counters,
            ebpf: Mutex::new(Some(ebpf)),
            lock: Mutex::new(Some(lock)),
            proxy_cgroups: Mutex::new(proxy_cgroups),
            hop,
            pins,
            cgroup: opts.cgroup.clone(),
            takeover,
            layout: layout.name,
        })
    }

    /// For a start that fails: when this start made the pins (there were none to take over),
    /// removes them, so a daemon that never came up leaves nothing attached. Pins taken over
    /// from an earlier daemon stay, as they are, capturing.
    pub fn abandon(&self) {
        let t = &self.takeover;
        let found_some = t.adopted_maps
            || !t.carried_over.is_empty()
            || t.links_updated > 0
            || t.links_replaced > 0
            || t.inbound_updated > 0;
        if found_some {
            return;
        }
        let pins = self.pins.clone();
        if let Err(e) = pins.remove_all() {
            tracing::warn!(error = %e, "cannot remove the pins of a failed start");
        }
        if let Ok(dir) = File::open(&self.cgroup) {
            let _ = detach_all(&self.cgroup, &dir);
        }
        self.release();
    }

    /// A duplicate of the open cgroup lock file, to hand over.
    pub fn lock_file(&self) -> Option<std::os::fd::OwnedFd> {
        let lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        lock.as_ref()
            .and_then(|l| l.file().try_clone().ok())
            .map(Into::into)
    }

    /// Whether another daemon owns the cgroup lock's file: this one offered the lock in a
    /// handoff (or handed it over), or has not finished taking it over. A stop then leaves the
    /// file alone.
    pub fn set_lock_handed_over(&self, handed: bool) {
        if let Some(lock) = self.lock.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            lock.set_handed_over(handed);
        }
    }

    /// Lets go of the cgroup lock, which a new daemon holds now (its file is that daemon's).
    pub fn hand_over_lock(&self) {
        let lock = self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lock) = lock {
            lock.set_handed_over(true);
        }
    }

    /// The name of this daemon's maps layout.
    pub fn layout(&self) -> &str {
        &self.layout
    }

    /// The daemon that handed over to this one has exited: its cgroup is exempt no more.
    pub fn forget_daemon(&self, cgroup_id: u64) {
        let mut map = self.proxy_cgroups.lock().unwrap_or_else(|p| p.into_inner());
        let _ = map.remove(&cgroup_id);
    }

    /// What the start found pinned and did with it.
    pub fn takeover(&self) -> &Takeover {
        &self.takeover
    }

    /// Where this node's maps and links are pinned.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Lets go of the programs and the claim on the cgroup, for shutdown. The pinned links
    /// keep capturing: until the next daemon takes them over, enrolled pods' connects are
    /// refused (nothing listens on the proxy's port) and STRICT keeps dropping plaintext.
    pub fn release(&self) {
        drop(self.ebpf.lock().unwrap_or_else(|p| p.into_inner()).take());
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Starts redirecting connects made in the netns with this cookie; whether it was not
    /// enrolled yet (an earlier daemon's enrollment is kept as it is).
    pub fn enroll(&self, netns_cookie: u64) -> Result<bool, CaptureError> {
        const BPF_NOEXIST: u64 = 1;
        match self
            .enrolled_map()
            .insert(netns_cookie, Enrollment::default(), BPF_NOEXIST)
        {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(source) => Err(CaptureError::Map {
                name: names::ENROLLED,
                source,
            }),
        }
    }

    /// Attaches the inbound program (tcx ingress) to every interface of the calling thread's
    /// netns (that of the pod `netns_cookie`) but loopback that does not run it already:
    /// `mycel_inbound` where packets start with an Ethernet header, `mycel_inbound_l3`
    /// elsewhere, each link pinned. Whether an interface runs it is asked of the kernel, not
    /// of a list kept here, so an interface deleted and made again under the same index gets
    /// it again, and one whose link an earlier daemon pinned is left as it is. An interface it
    /// cannot be attached to is named among the failures, for the caller to refuse the pod or
    /// set it down ([`set_down`]). Call it on the pod's netns thread.
    pub fn attach_inbound(&self, netns_cookie: u64) -> Result<Attached, CaptureError> {
        let interfaces =
            nix::net::if_::if_nameindex().map_err(|e| CaptureError::Interfaces(e.into()))?;
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = ebpf.as_ref().ok_or(CaptureError::Released)?;
        let program = |name| ebpf.program(name).ok_or(CaptureError::Missing(name));
        let (eth, l3) = (program(names::INBOUND)?, program(names::INBOUND_L3)?);
        let ours = [eth, l3].map(|p| p.info().ok().map(|i| i.id()));
        let (eth, l3) = (
            program_fd(eth, names::INBOUND)?,
            program_fd(l3, names::INBOUND_L3)?,
        );
        let mut out = Attached::default();
        for iface in interfaces.iter() {
            let raw = iface.name().to_bytes();
            let kind = link_type::of(raw);
            if kind == Some(link_type::Kind::Loopback) {
                continue;
            }
            // Covered only while the link is pinned too: an unpinned one detaches a moment
            // later (the kernel releases it asynchronously), whatever runs now.
            let running = attach::tcx_ingress_programs(iface.index());
            let pinned = [TcxKind::Ethernet, TcxKind::L3]
                .iter()
                .any(|k| self.pins.tcx_link(netns_cookie, iface.index(), *k).exists());
            if pinned
                && running
                    .as_ref()
                    .is_ok_and(|ids| ids.iter().any(|id| ours.contains(&Some(*id))))
            {
                continue;
            }
            let name = String::from_utf8_lossy(raw).into_owned();
            let (kind, prog) = if kind == Some(link_type::Kind::Ethernet) {
                (TcxKind::Ethernet, eth.as_fd())
            } else {
                (TcxKind::L3, l3.as_fd())
            };
            match links::attach_inbound(&self.pins, netns_cookie, iface.index(), kind, prog) {
                Ok(()) => out.links.push(Inbound {
                    ifindex: iface.index(),
                    name,
                }),
                // Gone between the listing and the attach: nothing arrives on it any more.
                Err(_) if !link_type::exists(raw) => {}
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

    /// Whether new pod-local hop sockets join the socket map (their bytes then go socket to
    /// socket). Connections already on a path keep it. `Err` with the reason when asked to
    /// turn it on where it is unavailable (then it stays off).
    pub fn set_local_hop(&self, sockmap: bool) -> Result<(), HopError> {
        self.hop.set(sockmap)
    }

    /// Makes the open-ports map hold exactly `ports`.
    pub fn set_open_ports(&self, ports: &HashSet<u16>) -> SetUpdate {
        self.open_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync(ports)
    }

    /// Stops redirecting new connects from this netns and detaches the inbound program from
    /// its interfaces; open connections are not touched.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<u32, CaptureError> {
        let flags = self
            .enrolled_map()
            .get(&netns_cookie, 0)
            .map_or(0, |e| e.flags);
        match self.enrolled_map().remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(CaptureError::Map {
                    name: names::ENROLLED,
                    source,
                })
            }
        }
        self.pins.remove_tcx_pod(netns_cookie)?;
        Ok(flags)
    }

    /// Adds `flags` (`ENROLLED_*`) to the enrolled pod's entry.
    pub fn add_enrollment_flags(&self, netns_cookie: u64, flags: u32) -> Result<(), CaptureError> {
        let map_err = |source| CaptureError::Map {
            name: names::ENROLLED,
            source,
        };
        let mut map = self.enrolled_map();
        let mut entry = map.get(&netns_cookie, 0).map_err(map_err)?;
        entry.flags |= flags;
        const BPF_EXIST: u64 = 2;
        map.insert(netns_cookie, entry, BPF_EXIST).map_err(map_err)
    }

    /// Unenrolls every pod the kernel holds but `keep`: those an earlier daemon enrolled that
    /// this one's first complete set no longer has (they left the mesh, or their netns went,
    /// while no daemon ran). Returns how many.
    pub fn keep_only_enrolled(&self, keep: &HashSet<u64>) -> usize {
        let held: Vec<u64> = self.enrolled_map().keys().filter_map(Result::ok).collect();
        let pinned = self.pins.tcx_pods().unwrap_or_default();
        let all: std::collections::BTreeSet<u64> = held.into_iter().chain(pinned).collect();
        let mut removed = 0;
        for cookie in all {
            if keep.contains(&cookie) {
                continue;
            }
            match self.unenroll(cookie) {
                Ok(_) => removed += 1,
                Err(e) => tracing::warn!(cookie, error = %e, "cannot remove a stale enrollment"),
            }
        }
        removed
    }

    /// Detaches the inbound program from the pod's interfaces `ifindexes` (unpins their links).
    pub fn detach_inbound(&self, netns_cookie: u64, ifindexes: &[u32]) {
        for l in self.pins.tcx_links().unwrap_or_default() {
            if l.netns_cookie == netns_cookie && ifindexes.contains(&l.ifindex) {
                let _ = std::fs::remove_file(&l.path);
            }
        }
    }

    /// Unpins the inbound links of the pod's interfaces that are not in `present` (gone).
    pub fn forget_interfaces(&self, netns_cookie: u64, present: &HashSet<u32>) -> usize {
        links::forget_inbound(&self.pins, netns_cookie, present)
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

/// The name of the maps layout a daemon with `orig_dst_capacity` uses.
pub fn layout_name(orig_dst_capacity: u32) -> Result<String, CaptureError> {
    Ok(Layout::of(OBJECT, orig_dst_capacity)?.name)
}

/// Where the daemon that owns `cgroup` answers a new daemon that wants to take over.
pub fn handoff_path(cgroup: &Path) -> Result<PathBuf, CaptureError> {
    let dir = File::open(cgroup).map_err(|source| CaptureError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    Ok(attach::handoff_path(cgroup, &dir)?)
}

/// Removes the capture of node `node` from `cgroup`: its pins under `bpffs` (the links detach
/// with them) and any other Mycel attachment on the cgroup. Refused while a daemon owns the
/// cgroup.
/// `cgroup_root` is the cgroup2 mount, where the daemons that use the pins are looked for:
/// one that runs (on any cgroup: the lock is per cgroup, the pins per node) refuses it.
pub fn uninstall(
    cgroup: &Path,
    cgroup_root: &Path,
    bpffs: &Path,
    node: &str,
) -> Result<pins::Removed, CaptureError> {
    let cgroup_dir = File::open(cgroup).map_err(|source| CaptureError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let _lock = attach::claim(cgroup, &cgroup_dir)?;
    let removed = match Pins::existing(bpffs, node)? {
        Some(pins) => {
            let running = own_cgroup::with_processes(cgroup_root, &pins.daemon_cgroups());
            if let Some(dir) = running.first() {
                return Err(CaptureError::DaemonRuns {
                    node: node.to_owned(),
                    cgroup: dir.clone(),
                });
            }
            pins.remove_all()?
        }
        None => pins::Removed::default(),
    };
    detach_all(cgroup, &cgroup_dir)?;
    Ok(removed)
}

/// Detaches every Mycel program from the cgroup, waiting (up to five seconds: the kernel
/// releases a link after an RCU grace period, which a busy machine stretches) for links whose
/// pins were just removed, so that the caller returns to a cgroup with nothing of Mycel on it.
fn detach_all(cgroup: &Path, cgroup_dir: &File) -> Result<(), CaptureError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        attach::remove_stale(cgroup, cgroup_dir, &[])?;
        let left =
            attach::any_attached(cgroup_dir).map_err(|source| attach::AttachError::Query {
                cgroup: cgroup.to_path_buf(),
                source,
            })?;
        if !left {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(CaptureError::StillAttached(cgroup.to_path_buf()));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
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

/// Loads (without attaching) every program of the object.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    fn program<'a>(
        ebpf: &'a mut Ebpf,
        name: &'static str,
    ) -> Result<&'a mut Program, CaptureError> {
        ebpf.program_mut(name).ok_or(CaptureError::Missing(name))
    }
    let err = |name| move |source| CaptureError::Program { name, source };
    for name in [
        names::CONNECT4,
        names::CONNECT6,
        names::GETPEERNAME4,
        names::GETPEERNAME6,
    ] {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(err(name))?;
        prog.load().map_err(err(name))?;
    }
    let name = names::SOCK_OPS;
    let prog: &mut SockOps = program(ebpf, name)?.try_into().map_err(err(name))?;
    prog.load().map_err(err(name))?;
    for name in [names::INBOUND, names::INBOUND_L3] {
        let prog: &mut SchedClassifier = program(ebpf, name)?.try_into().map_err(err(name))?;
        prog.load().map_err(err(name))?;
    }
    Ok(())
}

/// A loaded program's fd, duplicated so that it can be used while the object is borrowed.
fn program_fd(prog: &Program, name: &'static str) -> Result<std::os::fd::OwnedFd, CaptureError> {
    prog.fd()
        .and_then(|fd| {
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(aya::programs::ProgramError::IOError)
        })
        .map_err(|source| CaptureError::Program { name, source })
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
