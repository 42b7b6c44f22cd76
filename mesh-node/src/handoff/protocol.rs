//! What the two daemons say during a handoff, one message per datagram of a Unix
//! `SOCK_SEQPACKET` socket: a JSON object of at most [`MAX_MESSAGE`] bytes, with the
//! descriptors it names attached (`SCM_RIGHTS`, at most [`MAX_FDS`] per message).
//!
//! ```text
//! new → old   hello     {version, pid, node, layout}
//! old → new   offer     {proxy_cgroup, items, more}   + one fd per item, in order
//!             (repeated while `more`)
//! new → old   ready     the new daemon is up and accepting on the sockets
//! old → new   released  {quic_closed}: the old one stopped accepting, closed its QUIC
//!                       connections, and no longer reads the UDP sockets
//! old → new   refused   {reason}, instead of an offer
//! ```
//!
//! The labels are only claims: the taking side checks every descriptor against its label
//! (`sockets.rs`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Bumped when a message changes meaning; a daemon refuses a hello of another version.
pub const VERSION: u32 = 1;
/// The largest message either side sends or reads: room for [`MAX_FDS`] items of the longest
/// kind (a pod's IPv6 listener, about 100 bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// `SCM_MAX_FD`: the kernel refuses more descriptors in one message.
pub const MAX_FDS: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello {
        version: u32,
        pid: u32,
        /// The node the new daemon runs as, and the layout of its maps: the old daemon hands
        /// over only to one of the same node and layout (a layout change is not handed over).
        node: String,
        layout: String,
    },
    Offer {
        /// The old daemon's cgroup id: its own connects stay exempt from capture while it
        /// drains.
        proxy_cgroup: u64,
        items: Vec<Item>,
        /// Whether another offer follows.
        more: bool,
    },
    Ready,
    Released {
        /// QUIC connections the old daemon closed.
        quic_closed: u64,
    },
    Refused {
        reason: String,
    },
}

/// What a handed-over descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Item {
    /// The open lock file that makes its holder the cgroup's one daemon (its `flock` goes
    /// with the open file, to whoever holds it).
    Lock,
    /// The admin endpoint's listener.
    Admin,
    /// The metrics endpoint's listener.
    Metrics,
    /// The CNI plugin's Unix listener (Kubernetes mode).
    Cni,
    /// A pod's TCP listener: the outbound (15001), plaintext (15006) or tunnel (15008) port.
    Tcp { netns_cookie: u64, addr: SocketAddr },
    /// A pod's QUIC socket (UDP 15008).
    Udp { netns_cookie: u64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message of {0} bytes, more than {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("not a handoff message: {0}")]
    Malformed(String),
    #[error("{items} items but {fds} descriptors")]
    FdCount { items: usize, fds: usize },
    #[error("an offer of {0} items, more than {MAX_FDS}")]
    TooManyItems(usize),
}

impl Message {
    /// How many descriptors travel with the message.
    pub fn fds(&self) -> usize {
        match self {
            Message::Offer { items, .. } => items.len(),
            _ => 0,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        if let Message::Offer { items, .. } = self {
            if items.len() > MAX_FDS {
                return Err(ProtocolError::TooManyItems(items.len()));
            }
        }
        let bytes =
            serde_json::to_vec(self).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// The message in `bytes`, which arrived with `fds` descriptors.
    pub fn decode(bytes: &[u8], fds: usize) -> Result<Self, ProtocolError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        let msg: Message = serde_json::from_slice(bytes).map_err(|e| {
            // The reason may quote the sender's text: one line, printable.
            let reason: String = e
                .to_string()
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            ProtocolError::Malformed(reason)
        })?;
        if msg.fds() > MAX_FDS {
            return Err(ProtocolError::TooManyItems(msg.fds()));
        }
        if msg.fds() != fds {
            return Err(ProtocolError::FdCount {
                items: msg.fds(),
                fds,
            });
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let offer = Message::Offer {
            proxy_cgroup: 7,
            items: vec![
                Item::Lock,
                Item::Admin,
                Item::Tcp {
                    netns_cookie: 9,
                    addr: "[::1]:15001".parse().unwrap(),
                },
                Item::Udp { netns_cookie: 9 },
            ],
            more: false,
        };
        for msg in [
            Message::Hello {
                version: 1,
                pid: 2,
                node: "n1".into(),
                layout: "maps-v1-00".into(),
            },
            offer,
            Message::Ready,
            Message::Released { quic_closed: 3 },
            Message::Refused {
                reason: "busy".into(),
            },
        ] {
            let bytes = msg.encode().unwrap();
            assert_eq!(Message::decode(&bytes, msg.fds()).unwrap(), msg);
        }
    }

    #[test]
    fn the_descriptors_must_match_the_items() {
        let bytes = Message::Offer {
            proxy_cgroup: 1,
            items: vec![Item::Lock],
            more: false,
        }
        .encode()
        .unwrap();
        assert_eq!(
            Message::decode(&bytes, 0),
            Err(ProtocolError::FdCount { items: 1, fds: 0 })
        );
        let ready = Message::Ready.encode().unwrap();
        assert!(Message::decode(&ready, 1).is_err());
    }

    #[test]
    fn bad_input_is_refused_on_one_line() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"type\":\"hello\",\"version\":1,\"pid\":1,\"node\":\"a\",\"layout\":\"b\",\"extra\":1}",
            b"{\"type\":\"nope\"}",
            b"{\"type\":\"offer\",\"proxy_cgroup\":1,\"items\":[{\"kind\":\"tcp\"}],\"more\":false}",
            b"{\"type\":\"refused\",\"reason\":\"a\nb\"\n\x01",
        ] {
            let e = Message::decode(bad, 0).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(
            Message::decode(&big, 0),
            Err(ProtocolError::TooLarge(MAX_MESSAGE + 1))
        );
        let many = Message::Offer {
            proxy_cgroup: 1,
            items: vec![Item::Admin; MAX_FDS + 1],
            more: false,
        };
        assert_eq!(many.encode(), Err(ProtocolError::TooManyItems(MAX_FDS + 1)));
    }
}
