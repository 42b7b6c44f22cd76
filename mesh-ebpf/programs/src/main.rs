//! Mycel's kernel side: steer TCP connects of enrolled pods into the node proxy.
//!
//! `connect4/6` rewrite the destination of a connect from an enrolled netns to the proxy's
//! outbound listener on loopback *in the same netns* and remember the original destination by
//! socket cookie. Once the kernel has picked the source port, `sock_ops` copies that record to a
//! map keyed by what the proxy sees on `accept()` (netns cookie + client address), and on close it
//! removes both. `getpeername4/6` answer with the original destination so the rewrite is
//! invisible to the application.
//!
//! Before redirecting, a connect whose (pod, destination, port) is in `FAST_DENY` is refused
//! (the application's `connect()` fails with EPERM): user space puts there only what the
//! destination's policy denies anyway, so the attempt never leaves the pod.
//!
//! `mycel_inbound` (tcx ingress on every enrolled pod's interfaces; `mycel_inbound_l3` on those
//! without an Ethernet header) keeps plaintext honest: a TCP SYN to the pod on a port that is
//! not open (the tunnel port, configured exemptions) is dropped (STRICT) or handed to the node
//! proxy's plaintext listener with `bpf_sk_assign` (PERMISSIVE), where policy applies. It fails
//! closed: what it cannot classify as "not a TCP connection attempt" or "one to an open port"
//! (a truncated or malformed header, a TCP fragment, IPsec, a chain of IPv6 extension headers
//! or VLAN tags past its bound) is dropped. The node proxy itself reaches the pod's application
//! over the pod's loopback, so it never crosses this hook; it does so from the client's
//! address, on sockets marked `TRANSPARENT_MARK`, which the application's accepted side takes
//! too. A segment by an interface for such a socket is therefore forged, and dropped; so is a
//! SYN whose addresses and ports such a socket already holds (a second socket on them would
//! take the first one's packets).
//!
//! The connect hooks leave alone the connects of the node daemon's own tasks, recognised by
//! their cgroup (`PROXY_CGROUPS`, written by the daemon), which a pod cannot join. It is a map
//! rather than a load-time constant because the maps outlive the daemon (they are pinned):
//! during an upgrade the old and the new daemon, each in its own cgroup, both proxy.
//!
//! The pod-local hop (an application's socket and the node proxy's in the pod's netns, both
//! ways: the app's redirected connect and the proxy's accepted socket on the outbound port; the
//! proxy's transparent delivery socket and the app's accepted one, both marked) can skip
//! loopback TCP: `sock_ops` puts those sockets into `HOP_SOCKS` as they become established, and
//! `mycel_hop` (`sk_msg`, attached to that map) hands each send to the peer socket's receive
//! queue. A socket's first send decides its direction for good (`HOP_STATE`).
//!
//! Every decision bumps a per-CPU counter; user space sums them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, sk_action::SK_PASS, tcx_action_base::{TCX_DROP, TCX_NEXT, TCX_PASS},
        BPF_EXIST, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_LISTEN,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_assign,
        bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, classifier, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use core::ptr::read_volatile;
use mesh_ebpf_common::{
    Counter, Enrollment, FastDenyKey, HopKey, OrigDst, SockAddr, TupleKey, AF_INET, AF_INET6,
    ENROLLED_CAPACITY, FAST_DENY_CAPACITY, HOP_DIRECT, HOP_TCP, HOP_UNDECIDED, INBOUND_PERMISSIVE,
    INBOUND_STRICT, LOCAL_HOP_SOCKMAP, OPEN_PORTS_CAPACITY, ORIG_DST_CAPACITY, OUTBOUND_PORT,
    PLAINTEXT_PORT, PROXY_CGROUPS_CAPACITY, TRANSPARENT_MARK, TUNNEL_PORT,
};

const EBUSY: i32 = -16;
const EEXIST: i32 = -17;

/// Let the syscall proceed (with whatever the program wrote into the context).
const ALLOW: i32 = 1;
/// Refuse the syscall: `connect()` fails with EPERM.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

/// Cgroup ids of the node daemons' tasks, whose connects are the proxy's own. Empty exempts
/// nothing: a daemon that could not write itself here has its own connects redirected and
/// fails, in the open, rather than letting anything else through.
#[map]
static PROXY_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(PROXY_CGROUPS_CAPACITY, 0);

/// Netns cookies of the pods this node captures.
#[map]
static ENROLLED: HashMap<u64, Enrollment> = HashMap::with_max_entries(ENROLLED_CAPACITY, 0);

/// Original destination by socket cookie; lives until the socket closes. LRU because a connect
/// that fails before `sock_ops` runs (so no close callback is armed) would otherwise leak.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// Original destination by (netns cookie, client address). Entries are only created together
/// with a close callback that removes them, so a plain hash: when it is full, the insert fails
/// and is counted instead of silently evicting a live connection's record.
#[map]
static ORIG_BY_TUPLE: HashMap<TupleKey, OrigDst> = HashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// Connects refused before they leave the pod; see `FastDenyKey`.
#[map]
static FAST_DENY: HashMap<FastDenyKey, u32> = HashMap::with_max_entries(FAST_DENY_CAPACITY, 0);

/// Destination ports (host byte order) on which plaintext reaches the pod untouched: the tunnel
/// port and the configured exemptions. Written by the node daemon; the same for every pod.
#[map]
static OPEN_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(OPEN_PORTS_CAPACITY, 0);

/// The mesh's mTLS mode for the inbound program: `INBOUND_STRICT` or `INBOUND_PERMISSIVE`.
/// The program is only attached to enrolled pods' interfaces, so the mode is all it needs.
#[map]
static INBOUND_MODE: Array<u32> = Array::with_max_entries(1, 0);

/// The pod-local hop's sockets, by [`HopKey`]. A socket leaves it when it closes.
#[map]
static HOP_SOCKS: SockHash<HopKey> = SockHash::with_max_entries(2 * ORIG_DST_CAPACITY, 0);

/// How each hop socket's sends travel (`HOP_*`), by its own key (`sk_msg` cannot read a
/// socket cookie). LRU: the node proxy's sockets may close after its daemon (whose cgroup
/// link runs their close callback) is gone. An entry that goes early only moves its socket's
/// later sends to TCP, which keeps the order.
#[map]
static HOP_STATE: LruHashMap<HopKey, u32> = LruHashMap::with_max_entries(2 * ORIG_DST_CAPACITY, 0);

/// `LOCAL_HOP_SOCKMAP` when new hop sockets join `HOP_SOCKS` (the mesh's `localHop`).
#[map]
static LOCAL_HOP: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

/// Checks shared by both connect hooks. Returns the pod's netns cookie when the connect must be
/// redirected.
#[inline(always)]
fn should_redirect(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP || sa.type_ != SOCK_STREAM {
        count(Counter::SkippedOther);
        return None;
    }
    // SAFETY: helper is allowed for cgroup sock_addr programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { PROXY_CGROUPS.get(&cgroup) }.is_some() {
        count(Counter::SkippedProxy);
        return None;
    }
    // SAFETY: helper is allowed for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        count(Counter::SkippedNotEnrolled);
        return None;
    }
    Some(netns)
}

/// Whether policy refuses this connect: an entry for the exact port, or for every port.
#[inline(always)]
fn fast_denied(netns_cookie: u64, dst: SockAddr) -> bool {
    let mut key = FastDenyKey {
        netns_cookie,
        dst,
        _pad: 0,
    };
    // SAFETY: read-only lookups of plain values.
    if unsafe { FAST_DENY.get(&key) }.is_some() {
        return true;
    }
    key.dst.port = 0;
    unsafe { FAST_DENY.get(&key) }.is_some()
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: SockAddr) -> bool {
    // SAFETY: helper is allowed for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, &OrigDst { dst }, 0).is_err() {
        count(Counter::MapFull);
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn mycel_connect4(ctx: SockAddrContext) -> i32 {
    let Some(netns) = should_redirect(&ctx) else {
        return ALLOW;
    };
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4;
    // Loopback stays inside the pod: the app talking to itself is not mesh traffic.
    if u32::from_be(ip) >> 24 == 127 {
        count(Counter::SkippedOther);
        return ALLOW;
    }
    let dst = SockAddr {
        addr: [ip, 0, 0, 0],
        port: sa.user_port as u16,
        family: AF_INET,
    };
    if fast_denied(netns, dst) {
        count(Counter::FastDenied);
        debug!(&ctx, "connect4 refused by policy");
        return REFUSE;
    }
    if !remember(&ctx, dst) {
        // Without a record the proxy could not recover the destination, and letting the
        // connect go to it unredirected would send it around the mesh: refuse it (EPERM);
        // the counter says why.
        return REFUSE;
    }
    sa.user_ip4 = u32::to_be(0x7f00_0001);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(Counter::Redirected);
    debug!(&ctx, "connect4 redirected to proxy");
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mycel_connect6(ctx: SockAddrContext) -> i32 {
    let Some(netns) = should_redirect(&ctx) else {
        return ALLOW;
    };
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let is_v6_loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::to_be(1);
    let is_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::to_be(0xffff);
    let is_mapped_loopback = is_mapped && u32::from_be(ip[3]) >> 24 == 127;
    if is_v6_loopback || is_mapped_loopback {
        count(Counter::SkippedOther);
        return ALLOW;
    }
    let dst = SockAddr {
        addr: ip,
        port: sa.user_port as u16,
        family: AF_INET6,
    };
    // Policy entries for IPv4 destinations are in the AF_INET form, also for a dual-stack
    // socket connecting to an IPv4-mapped address.
    let policy_dst = if is_mapped {
        SockAddr {
            addr: [ip[3], 0, 0, 0],
            port: dst.port,
            family: AF_INET,
        }
    } else {
        dst
    };
    if fast_denied(netns, policy_dst) {
        count(Counter::FastDenied);
        debug!(&ctx, "connect6 refused by policy");
        return REFUSE;
    }
    if !remember(&ctx, dst) {
        return REFUSE;
    }
    sa.user_ip6[0] = 0;
    sa.user_ip6[1] = 0;
    sa.user_ip6[2] = 0;
    sa.user_ip6[3] = u32::to_be(1);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(Counter::Redirected);
    debug!(&ctx, "connect6 redirected to proxy");
    ALLOW
}

/// Rewrites the peer address reported to the application back to the original destination.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: helper is allowed for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return ALLOW;
    };
    let orig = *orig;
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if v6 {
        sa.user_ip6[0] = orig.dst.addr[0];
        sa.user_ip6[1] = orig.dst.addr[1];
        sa.user_ip6[2] = orig.dst.addr[2];
        sa.user_ip6[3] = orig.dst.addr[3];
    } else {
        sa.user_ip4 = orig.dst.addr[0];
    }
    sa.user_port = u32::from(orig.dst.port);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn mycel_getpeer4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mycel_getpeer6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

/// The client address of a connection as `accept()` on the proxy will report it.
///
/// Context fields are read with volatile loads: the verifier only accepts loads at constant
/// offsets from the context pointer, and without them LLVM merges the IPv4 and IPv6 branches
/// into one load through a computed pointer.
#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> TupleKey {
    let ops = ctx.ops;
    // SAFETY: helper is allowed for sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the verifier guarantees `ops` points at a valid bpf_sock_ops.
    let (family, port, addr) = unsafe {
        let family = read_volatile(&(*ops).family);
        let port = read_volatile(&(*ops).local_port);
        let addr = if family == u32::from(AF_INET6) {
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ]
        } else {
            [read_volatile(&(*ops).local_ip4), 0, 0, 0]
        };
        (family, port, addr)
    };
    TupleKey {
        netns_cookie,
        src: SockAddr {
            addr,
            // sock_ops reports the local port in host byte order.
            port: (port as u16).to_be(),
            family: family as u16,
        },
        _pad: 0,
    }
}

#[sock_ops]
pub fn mycel_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx, true),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx, false),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
}

/// A socket's addresses as `sock_ops` or `sk_msg` present them (the same field names).
struct Tuple {
    family: u32,
    local: [u32; 4],
    remote: [u32; 4],
    /// Host byte order.
    local_port: u32,
    /// As the context has it: the network-order port, shifted into the upper half on
    /// little-endian kernels.
    remote_port: u32,
}

/// Reads a [`Tuple`] from a context pointer; volatile loads at constant offsets, as the
/// verifier requires (see [`client_key`]).
macro_rules! tuple_of_ctx {
    ($ptr:expr) => {{
        let p = $ptr;
        // SAFETY: the verifier guarantees `p` points at a valid context of its type.
        unsafe {
            let family = read_volatile(&(*p).family);
            let (local, remote) = if family == u32::from(AF_INET6) {
                (
                    [
                        read_volatile(&(*p).local_ip6[0]),
                        read_volatile(&(*p).local_ip6[1]),
                        read_volatile(&(*p).local_ip6[2]),
                        read_volatile(&(*p).local_ip6[3]),
                    ],
                    [
                        read_volatile(&(*p).remote_ip6[0]),
                        read_volatile(&(*p).remote_ip6[1]),
                        read_volatile(&(*p).remote_ip6[2]),
                        read_volatile(&(*p).remote_ip6[3]),
                    ],
                )
            } else {
                (
                    [read_volatile(&(*p).local_ip4), 0, 0, 0],
                    [read_volatile(&(*p).remote_ip4), 0, 0, 0],
                )
            };
            Tuple {
                family,
                local,
                remote,
                local_port: read_volatile(&(*p).local_port),
                remote_port: read_volatile(&(*p).remote_port),
            }
        }
    }};
}

#[inline(always)]
fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::to_be(0xffff)
}

/// The key of the socket with tuple `t` in netns `netns_cookie`; with `reversed`, of its peer
/// on the same host (the addresses and ports swapped).
#[inline(always)]
fn hop_key(netns_cookie: u64, t: &Tuple, reversed: bool) -> HopKey {
    let remote_be = if t.remote_port & 0xffff == 0 {
        (t.remote_port >> 16) as u16
    } else {
        t.remote_port as u16
    };
    let remote_port = u16::from_be(remote_be);
    let local_port = t.local_port as u16;
    let (mut family, mut local, mut remote) = (t.family as u16, t.local, t.remote);
    if family == AF_INET6 && is_v4_mapped(&local) && is_v4_mapped(&remote) {
        family = AF_INET;
        local = [local[3], 0, 0, 0];
        remote = [remote[3], 0, 0, 0];
    }
    let (local, remote, local_port, remote_port) = if reversed {
        (remote, local, remote_port, local_port)
    } else {
        (local, remote, local_port, remote_port)
    };
    HopKey {
        netns_cookie,
        local,
        remote,
        local_port,
        remote_port,
        family,
        _pad: 0,
    }
}

/// The socket's mark, 0 when the context has no full socket.
#[inline(always)]
fn mark_of(ctx: &SockOpsContext) -> u32 {
    // SAFETY: the verifier guarantees `ops` points at a valid bpf_sock_ops; its `sk` is
    // checked for null before use.
    unsafe {
        let sk = read_volatile(&(*ctx.ops).__bindgen_anon_2.sk);
        if sk.is_null() {
            return 0;
        }
        (*sk).mark
    }
}

/// Whether an established socket is one of a pod-local hop, whose bytes may go socket to
/// socket: the application's connect the connect hook redirected (it has a record) and the
/// proxy's transparent delivery socket (marked) when it connected; the proxy's socket on the
/// outbound port and the application's accepted delivery (marked, by `tcp_fwmark_accept`)
/// when it was accepted.
#[inline(always)]
fn is_hop_socket(ctx: &SockOpsContext, active: bool, cookie: u64) -> bool {
    if mark_of(ctx) == TRANSPARENT_MARK {
        return true;
    }
    if active {
        // SAFETY: read-only lookup of a plain value.
        unsafe { ORIG_BY_COOKIE.get(&cookie) }.is_some()
    } else {
        // SAFETY: the verifier guarantees `ops` points at a valid bpf_sock_ops.
        let port = unsafe { read_volatile(&(*ctx.ops).local_port) };
        port == u32::from(OUTBOUND_PORT)
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, active: bool) {
    if LOCAL_HOP.get(0).copied().unwrap_or(0) != LOCAL_HOP_SOCKMAP {
        return;
    }
    // SAFETY: helper is allowed for sock_ops programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return;
    }
    // SAFETY: helper is allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if !is_hop_socket(ctx, active, cookie) {
        return;
    }
    let mut key = hop_key(netns, &tuple_of_ctx!(ctx.ops), false);
    // The state first: a socket in the map without one goes by TCP for good. It replaces
    // what a closed socket with the same addresses may have left (its close callback did not
    // run when its daemon's cgroup link was gone).
    if HOP_STATE.insert(&key, &HOP_UNDECIDED, 0).is_err() {
        count(Counter::HopFull);
        return;
    }
    // The close callback removes the state early; without it the LRU ages it out.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    // SAFETY: the verifier guarantees `ops` points at a valid bpf_sock_ops.
    match HOP_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // Joined already (EEXIST, or EBUSY: it has a send hook): the same socket seen by a
        // second cgroup's link, the daemon's own cgroup below the captured one.
        Err(EBUSY | EEXIST) => {}
        Err(_) => {
            count(Counter::HopFull);
            let _ = HOP_STATE.remove(&key);
        }
    }
}

/// Every send of a hop socket: to the peer socket's receive queue when this direction went
/// direct from its first send and the peer is still there, else by TCP. Always `SK_PASS`: the
/// helper's "no peer" answer would fail the application's send.
#[sk_msg]
pub fn mycel_hop(ctx: SkMsgContext) -> u32 {
    // SAFETY: helper is allowed for sk_msg programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let tuple = tuple_of_ctx!(ctx.msg);
    let own = hop_key(netns, &tuple, false);
    // SAFETY: read-only lookup; the value is copied out at once.
    let Some(decided) = (unsafe { HOP_STATE.get(&own) }).copied() else {
        return SK_PASS;
    };
    if decided == HOP_TCP {
        return SK_PASS;
    }
    let mut peer = hop_key(netns, &tuple, true);
    let found = HOP_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == SK_PASS as i64;
    let next = if found { HOP_DIRECT } else { HOP_TCP };
    if decided == HOP_UNDECIDED {
        count(if found { Counter::HopDirect } else { Counter::HopTcp });
    }
    if next != decided {
        // An update rather than a write through the value looked up: a full LRU map recycles
        // an element at once, and it could be another socket's by now. Only an entry still
        // there is updated; a gone one means TCP from the next send on, which keeps the order.
        // A socket's sends are serialised by its lock, so nothing else decides for it.
        let _ = HOP_STATE.insert(&own, &next, u64::from(BPF_EXIST));
    }
    SK_PASS
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helper is allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return;
    };
    let orig = *orig;
    // Arm the close callback first: whatever happens next, the records are removed at close.
    if ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).is_err() {
        count(Counter::OrigDstLost);
        let _ = ORIG_BY_COOKIE.remove(&cookie);
        return;
    }
    let key = client_key(ctx);
    if ORIG_BY_TUPLE.insert(&key, &orig, u64::from(BPF_NOEXIST)).is_err() {
        count(Counter::MapFull);
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: helper is allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    let _ = ORIG_BY_TUPLE.remove(&client_key(ctx));
    // SAFETY: helper is allowed for sock_ops programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = HOP_STATE.remove(hop_key(netns, &tuple_of_ctx!(ctx.ops), false));
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects code that could get here.
    loop {}
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags (802.1ad, then 802.1Q) walked before the IP header; more are unclassifiable.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before the upper-layer header; more are unclassifiable.
const MAX_IPV6_HEADERS: usize = 8;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP_U8: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// For interfaces with an Ethernet header (veth, macvlan, ipvlan, ...).
#[classifier]
pub fn mycel_inbound(ctx: TcContext) -> i32 {
    police(&ctx, ethernet(&ctx))
}

/// For interfaces whose packets start at the IP header (ipip, GRE, WireGuard, tun, ...);
/// the kernel's `skb->protocol` says which IP.
#[classifier]
pub fn mycel_inbound_l3(ctx: TcContext) -> i32 {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    police(&ctx, ip(&ctx, proto, 0))
}

/// What the inbound hook makes of a packet.
enum Packet {
    /// Not TCP.
    Other,
    /// A TCP SYN without ACK.
    Syn(Syn),
    /// Any other TCP segment.
    Segment(Syn),
    /// Cannot be classified; dropped and counted under this counter.
    Unclassifiable(Counter),
}

/// Where a TCP segment's headers are.
struct Syn {
    l3: usize,
    l4: usize,
    v6: bool,
}

/// The verdict for a classified packet: `Err` is a load past the end of the packet (a
/// truncated header), which is unclassifiable too.
#[inline(always)]
fn police(ctx: &TcContext, packet: Result<Packet, i64>) -> i32 {
    let flags = INBOUND_MODE.get(0).copied().unwrap_or(0);
    if flags != INBOUND_STRICT && flags != INBOUND_PERMISSIVE {
        return TCX_NEXT;
    }
    match packet {
        Ok(Packet::Other) => TCX_NEXT,
        Ok(Packet::Segment(seg)) => match segment_verdict(ctx, &seg) {
            Ok(verdict) => verdict,
            Err(_) => {
                count(Counter::InboundMalformed);
                TCX_DROP
            }
        },
        Ok(Packet::Syn(syn)) => match syn_verdict(ctx, &syn, flags) {
            Ok(verdict) => verdict,
            Err(_) => {
                count(Counter::InboundMalformed);
                TCX_DROP
            }
        },
        Ok(Packet::Unclassifiable(counter)) => {
            count(counter);
            TCX_DROP
        }
        Err(_) => {
            count(Counter::InboundMalformed);
            TCX_DROP
        }
    }
}

/// A frame from its Ethernet header, through up to [`MAX_VLAN_TAGS`] VLAN tags.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Result<Packet, i64> {
    let mut proto = u16::from_be(ctx.load::<u16>(12)?);
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = u16::from_be(ctx.load::<u16>(l3 + 2)?);
        l3 += 4;
    }
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return Ok(Packet::Unclassifiable(Counter::InboundMalformed));
    }
    ip(ctx, proto, l3)
}

#[inline(always)]
fn ip(ctx: &TcContext, proto: u16, l3: usize) -> Result<Packet, i64> {
    match proto {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        // ARP and the rest are not TCP.
        _ => Ok(Packet::Other),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) -> Result<Packet, i64> {
    let version_ihl = ctx.load::<u8>(l3)?;
    let ihl = usize::from(version_ihl & 0x0f);
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Ok(Packet::Unclassifiable(Counter::InboundMalformed));
    }
    let proto = ctx.load::<u8>(l3 + 9)?;
    // More fragments, or a fragment offset: part of a larger packet.
    let fragment = u16::from_be(ctx.load::<u16>(l3 + 6)?) & 0x3fff != 0;
    match proto {
        // Its ports and flags may lie in another fragment (RFC 1858); reassembly happens
        // after this hook.
        IPPROTO_TCP_U8 if fragment => Ok(Packet::Unclassifiable(Counter::InboundFragment)),
        IPPROTO_TCP_U8 => tcp(ctx, l3, l3 + ihl * 4, false),
        // What IPsec carries is out of sight here.
        IPPROTO_ESP | IPPROTO_AH => Ok(Packet::Unclassifiable(Counter::InboundMalformed)),
        _ => Ok(Packet::Other),
    }
}

#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize) -> Result<Packet, i64> {
    if ctx.load::<u8>(l3)? >> 4 != 6 {
        return Ok(Packet::Unclassifiable(Counter::InboundMalformed));
    }
    let mut next = ctx.load::<u8>(l3 + 6)?;
    let mut off = l3 + 40;
    for _ in 0..MAX_IPV6_HEADERS {
        match next {
            IPPROTO_TCP_U8 => return tcp(ctx, l3, off, true),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // Length in 8-octet units, not counting the first 8.
                let len = (usize::from(ctx.load::<u8>(off + 1)?) + 1) * 8;
                next = ctx.load::<u8>(off)?;
                off += len;
            }
            IPPROTO_FRAGMENT => {
                // Every fragment's header names what the fragmented part starts with.
                let inner = ctx.load::<u8>(off)?;
                return Ok(match inner {
                    IPPROTO_TCP_U8
                    | IPPROTO_HOPOPTS
                    | IPPROTO_ROUTING
                    | IPPROTO_DSTOPTS
                    | IPPROTO_FRAGMENT
                    | IPPROTO_ESP
                    | IPPROTO_AH => Packet::Unclassifiable(Counter::InboundFragment),
                    _ => Packet::Other,
                });
            }
            IPPROTO_ESP | IPPROTO_AH => {
                return Ok(Packet::Unclassifiable(Counter::InboundMalformed))
            }
            // UDP, ICMPv6, no next header, ...: not TCP.
            _ => return Ok(Packet::Other),
        }
    }
    Ok(Packet::Unclassifiable(Counter::InboundMalformed))
}

/// The TCP header at `l4`: an opening SYN (SYN without ACK; data or other flags with it do
/// not matter), or another segment.
#[inline(always)]
fn tcp(ctx: &TcContext, l3: usize, l4: usize, v6: bool) -> Result<Packet, i64> {
    let tcp_flags = ctx.load::<u8>(l4 + 13)?;
    if tcp_flags & TCP_FLAG_SYN == 0 || tcp_flags & TCP_FLAG_ACK != 0 {
        return Ok(Packet::Segment(Syn { l3, l4, v6 }));
    }
    Ok(Packet::Syn(Syn { l3, l4, v6 }))
}

/// The segment's addresses and ports as a socket lookup takes them, with `dport` for its
/// destination port; and the size of the family's part of the tuple.
#[inline(always)]
fn tuple_of(ctx: &TcContext, seg: &Syn, dport: u16) -> Result<(bpf_sock_tuple, u32), i64> {
    // SAFETY: all-zero is a valid bpf_sock_tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if seg.v6 {
        // SAFETY: writing plain integers into the union's IPv6 member.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = ctx.load::<[u32; 4]>(seg.l3 + 8)?;
        t.daddr = ctx.load::<[u32; 4]>(seg.l3 + 24)?;
        t.sport = ctx.load::<u16>(seg.l4)?;
        t.dport = dport.to_be();
        core::mem::size_of_val(t)
    } else {
        // SAFETY: writing plain integers into the union's IPv4 member.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = ctx.load::<u32>(seg.l3 + 12)?;
        t.daddr = ctx.load::<u32>(seg.l3 + 16)?;
        t.sport = ctx.load::<u16>(seg.l4)?;
        t.dport = dport.to_be();
        core::mem::size_of_val(t)
    };
    Ok((tuple, size as u32))
}

/// What the socket holding `tuple` in this netns is: `None` without one, else its state and
/// mark.
#[inline(always)]
fn holder(ctx: &TcContext, tuple: &mut bpf_sock_tuple, size: u32) -> Option<(u32, u32)> {
    // SAFETY: the tuple lives on the stack for the call; the returned socket is released
    // before returning.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a valid referenced socket until released.
    let found = unsafe { ((*sk).state, (*sk).mark) };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut _) };
    Some(found)
}

/// A segment that is not an opening SYN: dropped when it is addressed to the application's
/// side of a connection the proxy made from its client's address (those come only over the
/// pod's loopback, from the proxy; from an interface, the source is forged), else through.
/// Segments from or to the tunnel port (the pod's tunnels) are none of those.
#[inline(always)]
fn segment_verdict(ctx: &TcContext, seg: &Syn) -> Result<i32, i64> {
    let sport = u16::from_be(ctx.load::<u16>(seg.l4)?);
    let dport = u16::from_be(ctx.load::<u16>(seg.l4 + 2)?);
    // The pod's tunnels, both ways: the proxy never delivers to the tunnel port, and the
    // pod's tunnel listener keeps it from being anyone's source port.
    if sport == TUNNEL_PORT || dport == TUNNEL_PORT {
        return Ok(TCX_NEXT);
    }
    let (mut tuple, size) = tuple_of(ctx, seg, dport)?;
    match holder(ctx, &mut tuple, size) {
        Some((_, mark)) if mark == TRANSPARENT_MARK => {
            count(Counter::InboundSpoofed);
            Ok(TCX_DROP)
        }
        _ => Ok(TCX_NEXT),
    }
}

/// Whether an opening SYN's addresses and ports are held by the application's side of a
/// connection the proxy made from its client's address. Any other holder (a stale connection
/// of a client that rebooted) is the kernel's to answer, with the challenge ACK that lets the
/// client reset it and retry.
#[inline(always)]
fn tuple_in_use(ctx: &TcContext, syn: &Syn, dport: u16) -> Result<bool, i64> {
    let (mut tuple, size) = tuple_of(ctx, syn, dport)?;
    Ok(holder(ctx, &mut tuple, size)
        .is_some_and(|(state, mark)| state != BPF_TCP_LISTEN && mark == TRANSPARENT_MARK))
}

/// An opening SYN: through to an open port; else dropped (STRICT) or handed to the
/// plaintext listener (PERMISSIVE).
#[inline(always)]
fn syn_verdict(ctx: &TcContext, syn: &Syn, flags: u32) -> Result<i32, i64> {
    let dport = u16::from_be(ctx.load::<u16>(syn.l4 + 2)?);
    // SAFETY: read-only lookup of a plain value.
    let open = unsafe { OPEN_PORTS.get(&dport) }.is_some();
    // A connection the proxy made from this client's address may hold these very addresses
    // and ports (the proxy never delivers to the tunnel port); a second socket on them would
    // take its packets.
    if (open || flags == INBOUND_PERMISSIVE) && dport != TUNNEL_PORT && tuple_in_use(ctx, syn, dport)? {
        count(Counter::InboundTupleInUse);
        return Ok(TCX_DROP);
    }
    if open {
        return Ok(TCX_NEXT);
    }
    if flags == INBOUND_STRICT {
        count(Counter::InboundDropped);
        return Ok(TCX_DROP);
    }
    // PERMISSIVE: the SYN goes to the proxy's plaintext listener in this netns, which sees the
    // original destination as its local address.
    let (mut tuple, size) = tuple_of(ctx, syn, PLAINTEXT_PORT)?;
    // SAFETY: the tuple lives on the stack for the call; the returned socket is released below
    // on every path.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        count(Counter::InboundNoListener);
        return Ok(TCX_DROP);
    }
    // SAFETY: `sk` is a valid referenced socket until released.
    let listening = unsafe { (*sk).state } == BPF_TCP_LISTEN;
    // SAFETY: as above; assignment takes its own reference.
    let assigned = listening && unsafe { bpf_sk_assign(ctx.as_ptr(), sk as *mut _, 0) } == 0;
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut _) };
    if !assigned {
        count(Counter::InboundNoListener);
        return Ok(TCX_DROP);
    }
    count(Counter::InboundSteered);
    Ok(TCX_PASS)
}
