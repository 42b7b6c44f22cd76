//! The handoff socket: a Unix `SOCK_SEQPACKET` socket (message boundaries kept, descriptors
//! attached with `SCM_RIGHTS`) under `/run/mycel`, which only root reaches (mode 0600; the
//! peer's uid is checked too). Every receive is bounded in size and in time.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use tokio::io::{unix::AsyncFd, Interest};

use super::protocol::{Message, ProtocolError, MAX_FDS, MAX_MESSAGE};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("handoff socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("handoff: {0}")]
    Io(#[from] std::io::Error),
    #[error("handoff: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("handoff: the peer closed the connection")]
    Closed,
    #[error("handoff: no message within {0:?}")]
    Timeout(Duration),
    #[error("handoff: a message or its descriptors were cut short")]
    Truncated,
    #[error("handoff: the peer runs as uid {0}, not as this daemon")]
    Stranger(u32),
}

/// One end of a handoff connection.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Checks that the peer of `fd` runs as this process's user (root, for mesh-node).
fn check_peer(fd: BorrowedFd<'_>) -> Result<(), ChannelError> {
    let cred =
        socket::getsockopt(&fd, socket::sockopt::PeerCredentials).map_err(std::io::Error::from)?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if cred.uid() != me {
        return Err(ChannelError::Stranger(cred.uid()));
    }
    Ok(())
}

impl Channel {
    fn new(fd: OwnedFd) -> Result<Self, ChannelError> {
        check_peer(fd.as_fd())?;
        // SAFETY: the AsyncFd owns the fd, so the fd outlives the registration.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Connects to the daemon listening at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ChannelError> {
        let err = |source| ChannelError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let fd = seqpacket().map_err(err)?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        // A Unix connect either completes at once or fails (EAGAIN: the backlog is full).
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
        Self::new(fd)
    }

    /// The peer's pid, as the kernel recorded it at connect.
    pub fn peer_pid(&self) -> Option<u32> {
        socket::getsockopt(self.fd.get_ref(), socket::sockopt::PeerCredentials)
            .ok()
            .and_then(|c| u32::try_from(c.pid()).ok())
    }

    /// Sends `msg` with `fds` (as many as the message names).
    pub async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let bytes = msg.encode()?;
        if fds.len() != msg.fds() || fds.len() > MAX_FDS {
            return Err(ProtocolError::FdCount {
                items: msg.fds(),
                fds: fds.len(),
            }
            .into());
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut ready = self.fd.writable().await?;
            let sent = ready.try_io(|inner| {
                let iov = [IoSlice::new(&bytes)];
                let cmsg = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
                socket::sendmsg::<()>(inner.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message with its descriptors, within `timeout`.
    pub async fn recv(&self, timeout: Duration) -> Result<(Message, Vec<OwnedFd>), ChannelError> {
        tokio::time::timeout(timeout, self.recv_any())
            .await
            .map_err(|_| ChannelError::Timeout(timeout))?
    }

    async fn recv_any(&self) -> Result<(Message, Vec<OwnedFd>), ChannelError> {
        loop {
            let mut ready = self.fd.readable().await?;
            // Only "would block" goes back to the reactor; every other outcome is the answer.
            let got = ready.try_io(|inner| match receive(inner.as_raw_fd()) {
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e),
                other => Ok(other),
            });
            match got {
                Ok(Ok(Ok(Some((bytes, fds))))) => {
                    let msg = Message::decode(&bytes, fds.len())?;
                    return Ok((msg, fds));
                }
                Ok(Ok(Ok(None))) => return Err(ChannelError::Closed),
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A datagram's bytes and the descriptors that came with it.
type Datagram = (Vec<u8>, Vec<OwnedFd>);

/// One datagram and the descriptors that came with it; `None` at end of stream. The
/// descriptors are owned as soon as they arrive, so none leaks whatever happens next.
fn receive(fd: RawFd) -> Result<Option<Datagram>, ChannelError> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this process.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || len > MAX_MESSAGE {
        return Err(ChannelError::Truncated);
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

/// The listening end, on the old daemon.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Listener {
    /// Listens at `path`, replacing a socket file nobody answers on (left by a crash).
    pub fn bind(path: &Path) -> Result<Self, ChannelError> {
        let err = |source| ChannelError::Socket {
            path: path.to_path_buf(),
            source,
        };
        crate::socket::clear_unix_path(path).map_err(err)?;
        let fd = seqpacket().map_err(err)?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        socket::listen(&fd, socket::Backlog::new(4).map_err(|e| err(e.into()))?)
            .map_err(|e| err(e.into()))?;
        // SAFETY: the AsyncFd owns the fd, so the fd outlives the registration.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| err(e.into_parts().1))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub async fn accept(&self) -> Result<Channel, ChannelError> {
        loop {
            let mut ready = self.fd.readable().await?;
            let accepted = ready.try_io(|inner| {
                socket::accept4(
                    inner.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(std::io::Error::from)
            });
            match accepted {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 returned a new descriptor that we now own.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Channel::new(fd);
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Removes the socket file: no daemon answers there any more.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::protocol::Item;

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mycel-handoff-{name}-{}.sock", std::process::id()))
    }

    #[tokio::test]
    async fn descriptors_cross_with_their_message() {
        let p = path("fds");
        let listener = Listener::bind(&p).unwrap();
        let (client, server) = tokio::join!(Channel::connect(&p), listener.accept());
        let (client, server) = (client.unwrap(), server.unwrap());
        let file = tempfile_fd();
        let offer = Message::Offer {
            proxy_cgroup: 1,
            items: vec![Item::Lock],
            more: false,
        };
        server.send(&offer, &[file.as_fd()]).await.unwrap();
        let (msg, fds) = client.recv(Duration::from_secs(5)).await.unwrap();
        assert_eq!(msg, offer);
        assert_eq!(fds.len(), 1);
        let a = nix::sys::stat::fstat(&file).unwrap();
        let b = nix::sys::stat::fstat(&fds[0]).unwrap();
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        // A message whose descriptors do not match its items is refused, and its descriptors
        // are closed, not leaked.
        let ready = Message::Ready.encode().unwrap();
        let raw = [file.as_raw_fd()];
        socket::sendmsg::<()>(
            server.fd.as_raw_fd(),
            &[IoSlice::new(&ready)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let refused = client.recv(Duration::from_secs(5)).await;
        assert!(
            matches!(refused, Err(ChannelError::Protocol(_))),
            "{:?}",
            refused.err()
        );
        drop(server);
        assert!(matches!(
            client.recv(Duration::from_secs(5)).await,
            Err(ChannelError::Closed)
        ));
        listener.remove();
    }

    #[tokio::test]
    async fn silence_and_oversized_messages_are_bounded() {
        let p = path("bounds");
        let listener = Listener::bind(&p).unwrap();
        let (client, server) = tokio::join!(Channel::connect(&p), listener.accept());
        let (client, server) = (client.unwrap(), server.unwrap());
        assert!(matches!(
            client.recv(Duration::from_millis(50)).await,
            Err(ChannelError::Timeout(_))
        ));
        let big = vec![b'x'; MAX_MESSAGE + 100];
        socket::send(server.fd.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        assert!(matches!(
            client.recv(Duration::from_secs(5)).await,
            Err(ChannelError::Truncated)
        ));
        listener.remove();
    }

    fn tempfile_fd() -> OwnedFd {
        let p = std::env::temp_dir().join(format!("mycel-handoff-file-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f.into()
    }
}
