//! Types shared by the kernel programs in `mesh-ebpf/programs` and the loader in `mesh-node`.
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on the byte layout
//! of map keys and values; the kernel compares keys byte by byte, so padding must be zeroed and
//! therefore named.
#![no_std]

/// Port of the outbound listener the node proxy opens inside every enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;

/// Port of the node proxy's plaintext listener inside every enrolled pod's netns: in PERMISSIVE
/// mode the inbound program hands it plaintext connections to the pod (`bpf_sk_assign`).
pub const PLAINTEXT_PORT: u16 = 15006;

/// Port of every enrolled pod's tunnel listener (TLS over TCP, and QUIC over UDP).
pub const TUNNEL_PORT: u16 = 15008;

/// `INBOUND_MODE[0]`: drop plaintext TCP connections to enrolled pods (STRICT).
pub const INBOUND_STRICT: u32 = 1;
/// `INBOUND_MODE[0]`: steer plaintext TCP connections to enrolled pods to the plaintext
/// listener (PERMISSIVE). Any other value: let plaintext through (before the first config).
pub const INBOUND_PERMISSIVE: u32 = 2;

/// Capacity of the open-ports map (ports that take plaintext untouched).
pub const OPEN_PORTS_CAPACITY: u32 = 256;

/// Capacity of the proxy-cgroup map: the cgroup ids of the node daemons running now (two
/// during an upgrade). Connects made by a task of one of these cgroups are the proxy's own and
/// are not redirected. A pod cannot put a task in another cgroup, unlike a socket mark, which
/// any task with CAP_NET_ADMIN or CAP_NET_RAW can set.
pub const PROXY_CGROUPS_CAPACITY: u32 = 8;

/// Version of the pinned maps' layout: the meaning of every map's key and value. The maps
/// outlive the daemon (pinned in bpffs, see `mesh-node/src/capture/pins.rs`), and a new
/// daemon adopts them only under the same version. Bump it whenever a map's key, value or
/// meaning changes; sizes and capacities are checked on adoption as well.
pub const LAYOUT_VERSION: u32 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Default capacity of the original-destination maps; `mesh-node --orig-dst-capacity` overrides.
pub const ORIG_DST_CAPACITY: u32 = 65_536;
/// Capacity of the enrolled-namespace map (one entry per enrolled pod on the node).
pub const ENROLLED_CAPACITY: u32 = 16_384;
/// Capacity of the fast-deny map: (pod, destination, port) verdicts pushed by the node.
pub const FAST_DENY_CAPACITY: u32 = 65_536;

/// Names of the maps and programs in the object, used by the loader.
pub mod names {
    pub const ENROLLED: &str = "ENROLLED";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const FAST_DENY: &str = "FAST_DENY";
    pub const OPEN_PORTS: &str = "OPEN_PORTS";
    pub const INBOUND_MODE: &str = "INBOUND_MODE";
    pub const PROXY_CGROUPS: &str = "PROXY_CGROUPS";
    pub const HOP_SOCKS: &str = "HOP_SOCKS";
    pub const HOP_STATE: &str = "HOP_STATE";
    pub const LOCAL_HOP: &str = "LOCAL_HOP";
    /// The `sk_msg` program of the local hop, attached to `HOP_SOCKS`.
    pub const HOP: &str = "mycel_hop";
    pub const INBOUND: &str = "mycel_inbound";
    /// The inbound program for interfaces without an Ethernet header (tunnels, tun, ...).
    pub const INBOUND_L3: &str = "mycel_inbound_l3";
    pub const CONNECT4: &str = "mycel_connect4";
    pub const CONNECT6: &str = "mycel_connect6";
    pub const GETPEERNAME4: &str = "mycel_getpeer4";
    pub const GETPEERNAME6: &str = "mycel_getpeer6";
    pub const SOCK_OPS: &str = "mycel_sockops";
}

/// An IPv4 or IPv6 socket address as the kernel hands it over: address words and port in
/// network byte order. IPv4 uses `addr[0]` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u16,
}

/// The destination an application asked for before the connect hook rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub dst: SockAddr,
}

/// Key of `ORIG_BY_TUPLE`: the client side of the redirected connection as the proxy sees it
/// from `accept()` (peer address), qualified by the pod's netns cookie because every pod has
/// its own 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TupleKey {
    pub netns_cookie: u64,
    pub src: SockAddr,
    pub _pad: u32,
}

/// Key of `FAST_DENY`: a connect from the pod with this netns cookie to `dst` is refused in the
/// kernel. `dst.port` 0 means every port. IPv4 destinations (also IPv4-mapped IPv6 ones) use the
/// `AF_INET` form.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FastDenyKey {
    pub netns_cookie: u64,
    pub dst: SockAddr,
    pub _pad: u32,
}

/// Key of `HOP_SOCKS`: a socket of the pod-local hop (an application's socket and the node
/// proxy's in the pod's netns) by its netns cookie and its own addresses, as its peer sees them
/// reversed. Ports in host byte order; an IPv4-mapped IPv6 pair in the `AF_INET` form, so that a
/// dual-stack application socket meets the proxy's IPv4 one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HopKey {
    pub netns_cookie: u64,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// `LOCAL_HOP[0]`: new hop sockets join `HOP_SOCKS` and their bytes go socket to socket. Any
/// other value: they stay on loopback TCP (connections already joined keep their path).
pub const LOCAL_HOP_SOCKMAP: u32 = 1;

/// `HOP_STATE` values, by the socket's own [`HopKey`]: how a hop socket's sends travel. A socket joins
/// `HOP_SOCKS` only after its entry is written `HOP_UNDECIDED`; its first send decides, and a
/// socket whose bytes went by TCP never goes direct (redirected bytes are read before the TCP
/// queue, so that order would reorder the stream). Direct then TCP keeps the order.
pub const HOP_UNDECIDED: u32 = 0;
pub const HOP_DIRECT: u32 = 1;
pub const HOP_TCP: u32 = 2;

/// Value of `ENROLLED`, keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enrollment {
    /// Per-pod flags for user space (the programs read none): `ENROLLED_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// `Enrollment::flags`: which of the pod netns's sysctls the daemon turned on when it set up
/// the pod's return routing, to turn off again when the pod leaves. Kept here because the
/// pinned map outlives the daemon that set them. `net.ipv4.tcp_fwmark_accept`:
pub const ENROLLED_ACCEPT_MARK_SET: u32 = 1;
/// `net.ipv4.fwmark_reflect`.
pub const ENROLLED_REFLECT_V4_SET: u32 = 2;
/// `net.ipv6.fwmark_reflect`.
pub const ENROLLED_REFLECT_V6_SET: u32 = 4;

/// Index into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect from an enrolled pod was rewritten to the proxy.
    Redirected = 0,
    /// A TCP connect from a namespace that is not enrolled.
    SkippedNotEnrolled = 1,
    /// A connect by the proxy itself (a task of the daemon's cgroup).
    SkippedProxy = 2,
    /// A connect from an enrolled pod to loopback, or not TCP.
    SkippedOther = 3,
    /// An original-destination entry could not be stored: the map is full. A connect that
    /// could not be recorded is refused (EPERM), never sent out unredirected.
    MapFull = 4,
    /// `sock_ops` could not arm the close callback, so the record was dropped (fail closed).
    OrigDstLost = 5,
    /// A connect refused in the kernel because policy denies it (the fast-deny map).
    FastDenied = 6,
    /// A plaintext connection to a pod dropped (STRICT).
    InboundDropped = 7,
    /// A plaintext connection to a pod handed to the proxy's plaintext listener (PERMISSIVE).
    InboundSteered = 8,
    /// A plaintext connection dropped because the plaintext listener was missing (PERMISSIVE).
    InboundNoListener = 9,
    /// A packet to a pod dropped because the hook could not classify it: truncated or
    /// malformed headers, too many IPv6 extension headers or VLAN tags, IPsec.
    InboundMalformed = 10,
    /// A fragment of a TCP packet to a pod, dropped: its flags and ports cannot be checked.
    InboundFragment = 11,
    /// A TCP segment from outside the pod for the application's side of a connection the
    /// node proxy made from its client's address (a socket with `TRANSPARENT_MARK`), dropped:
    /// those segments come only from the proxy, over the pod's loopback, so one from an
    /// interface carries a forged source address.
    InboundSpoofed = 12,
    /// An opening SYN whose addresses and ports are those of a connection the proxy made from
    /// its client's address (a plaintext client that picked the very port the proxy uses for
    /// its address), dropped: it would take that connection's packets. The client's SYN
    /// retransmits wait until that connection ends.
    InboundTupleInUse = 13,
    /// A pod-local hop socket's first send went socket to socket (`sk_msg` redirect); so do
    /// the rest of its sends while its peer is open.
    HopDirect = 14,
    /// A pod-local hop socket's first send found no peer socket in the map (it had not joined
    /// yet), so that direction of the connection stays on loopback TCP.
    HopTcp = 15,
    /// A pod-local hop socket could not join the socket map (it or the state map is full):
    /// its connection stays on loopback TCP.
    HopFull = 16,
}

/// The mark on the node proxy's sockets toward a pod's application, which the application's
/// accepted sockets take (`tcp_fwmark_accept`); user space sets it (`transparent::MARK`).
pub const TRANSPARENT_MARK: u32 = 0x4d43_0001;

impl Counter {
    pub const ALL: [Counter; 17] = [
        Counter::Redirected,
        Counter::SkippedNotEnrolled,
        Counter::SkippedProxy,
        Counter::SkippedOther,
        Counter::MapFull,
        Counter::OrigDstLost,
        Counter::FastDenied,
        Counter::InboundDropped,
        Counter::InboundSteered,
        Counter::InboundNoListener,
        Counter::InboundMalformed,
        Counter::InboundFragment,
        Counter::InboundSpoofed,
        Counter::InboundTupleInUse,
        Counter::HopDirect,
        Counter::HopTcp,
        Counter::HopFull,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::SkippedNotEnrolled => "skipped_not_enrolled",
            Counter::SkippedProxy => "skipped_proxy",
            Counter::SkippedOther => "skipped_other",
            Counter::MapFull => "map_full",
            Counter::OrigDstLost => "orig_dst_lost",
            Counter::FastDenied => "fast_denied",
            Counter::InboundDropped => "inbound_dropped",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundMalformed => "inbound_malformed",
            Counter::InboundFragment => "inbound_fragment",
            Counter::InboundSpoofed => "inbound_spoofed",
            Counter::InboundTupleInUse => "inbound_tuple_in_use",
            Counter::HopDirect => "hop_direct",
            Counter::HopTcp => "hop_tcp",
            Counter::HopFull => "hop_full",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data with no implicit padding (every field is sized and aligned so the
    // struct has no holes; `_pad` fields make it explicit where needed).
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::FastDenyKey {}
    unsafe impl aya::Pod for super::Enrollment {}
    unsafe impl aya::Pod for super::HopKey {}
}
