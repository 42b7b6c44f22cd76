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
//! Every decision bumps a per-CPU counter; user space sums them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use core::ptr::read_volatile;
use mesh_ebpf_common::{
    Counter, Enrollment, FastDenyKey, OrigDst, SockAddr, TupleKey, AF_INET, AF_INET6,
    ENROLLED_CAPACITY, FAST_DENY_CAPACITY, ORIG_DST_CAPACITY, OUTBOUND_PORT, PROXY_MARK,
};

/// Let the syscall proceed (with whatever the program wrote into the context).
const ALLOW: i32 = 1;
/// Refuse the syscall: `connect()` fails with EPERM.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

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
    // SAFETY: `sk` is always a valid socket pointer for sock_addr programs.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == PROXY_MARK {
        count(Counter::SkippedProxyMark);
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
        // Without a record the proxy could not recover the destination; fail open to the
        // original destination rather than break the connect, and the counter says so.
        return ALLOW;
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
        return ALLOW;
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
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
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
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects code that could get here.
    loop {}
}
