//! The few rtnetlink requests the pod's return routing needs: add and delete one policy rule
//! and one route, in the calling thread's netns. Each request waits for the kernel's
//! acknowledgement, so an error comes back with the request that caused it.
//!
//! Only the kernel writes to this socket (a netlink socket takes unicast messages from the
//! kernel or from a process with CAP_NET_ADMIN in the netns, and the reply must carry our
//! sequence number), and the one thing read of an answer is the error code.

use std::{io, os::fd::AsRawFd as _};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;

const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
/// `RTPROT_STATIC`: set up by an administrator (not a routing daemon, not the kernel).
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// What a request does: add (failing with `EEXIST` when it is there already) or delete
/// (failing with `ENOENT`/`ESRCH` when it is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// `ip rule add fwmark MARK lookup TABLE priority PRIORITY` for one address family.
pub fn rule(op: Op, family: u8, mark: u32, table: u32, priority: u32) -> io::Result<()> {
    let (kind, flags) = match op {
        Op::Add => (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL),
        Op::Delete => (RTM_DELRULE, 0),
    };
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let mut body = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    attr_u32(&mut body, FRA_PRIORITY, priority);
    attr_u32(&mut body, FRA_FWMARK, mark);
    attr_u32(&mut body, FRA_FWMASK, u32::MAX);
    attr_u32(&mut body, FRA_TABLE, table);
    request(kind, flags, &body)
}

/// `ip route add local 0.0.0.0/0 dev IFINDEX table TABLE` (or `::/0`): every destination is
/// this host's, reached over the interface `ifindex` (loopback).
pub fn local_default_route(op: Op, family: u8, ifindex: u32, table: u32) -> io::Result<()> {
    let (kind, flags) = match op {
        Op::Add => (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL),
        Op::Delete => (RTM_DELROUTE, 0),
    };
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut body = vec![
        family,
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    attr_u32(&mut body, RTA_TABLE, table);
    attr_u32(&mut body, RTA_OIF, ifindex);
    request(kind, flags, &body)
}

fn attr_u32(body: &mut Vec<u8>, kind: u16, value: u32) {
    // struct rtattr: length (header included), type; then the value, already 4-aligned.
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&kind.to_ne_bytes());
    body.extend_from_slice(&value.to_ne_bytes());
}

/// Sends one request and waits for its acknowledgement.
fn request(kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
    const SEQ: u32 = 1;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // A reply that does not come within a second means something is badly wrong; the caller
    // reports it rather than hanging the pod's netns thread.
    let timeout = nix::sys::time::TimeVal::new(1, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    // struct nlmsghdr: length, type, flags, sequence, port id (0: the kernel fills it in).
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&SEQ.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    send(fd.as_raw_fd(), &msg, MsgFlags::empty())?;
    let mut buf = [0u8; 4096];
    // The acknowledgement is the one message the kernel sends back for this request; a few
    // reads at most, in case of anything unexpected in between.
    for _ in 0..4 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if let Some(result) = ack(&buf[..n], SEQ) {
            return result;
        }
    }
    Err(io::Error::other("no acknowledgement from the kernel"))
}

/// The outcome an acknowledgement in `reply` reports for request `seq`, if it holds one.
fn ack(reply: &[u8], seq: u32) -> Option<io::Result<()>> {
    let field = |at: usize| -> Option<[u8; 4]> { reply.get(at..at + 4)?.try_into().ok() };
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    let got_seq = u32::from_ne_bytes(field(8)?);
    if kind != NLMSG_ERROR || got_seq != seq {
        return None;
    }
    // struct nlmsgerr: a negative errno, or 0 for success.
    let errno = i32::from_ne_bytes(field(16)?);
    Some(if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    })
}

#[cfg(test)]
mod tests {
    use super::ack;

    fn reply(kind: u16, seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&errno.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    #[test]
    fn acknowledgements_are_read_and_others_ignored() {
        assert!(matches!(ack(&reply(2, 1, 0), 1), Some(Ok(()))));
        let e = ack(&reply(2, 1, -libc::EEXIST), 1).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(
            ack(&reply(2, 7, 0), 1).is_none(),
            "another request's answer"
        );
        assert!(ack(&reply(3, 1, 0), 1).is_none(), "not an error message");
        assert!(ack(&reply(2, 1, 0)[..12], 1).is_none(), "truncated");
        assert!(ack(&[], 1).is_none());
    }
}
