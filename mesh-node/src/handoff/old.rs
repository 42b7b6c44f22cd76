//! The running daemon's side: hands its sockets to one new daemon at a time, and carries on
//! as before if that one does not take over.

use std::{sync::Arc, time::Duration};

use tokio::sync::oneshot;

use super::{
    channel::{Channel, ChannelError, Listener},
    gate::{Gate, Phase},
    protocol::{Message, MAX_FDS, VERSION},
    sockets::Sockets,
};

/// How long a connecting daemon has to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new daemon has, from its hello, to be up and say so. The new one gives up
/// sooner ([`super::new::READY_WITHIN`], from the same moment), so both agree on who runs;
/// the old one also says so when it gives up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the reconciler may take to finish what it is applying before it pauses.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an offer may wait for room in the socket (the new daemon reads them).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection to the daemon that took over, for the rest of the handoff.
pub struct TakenOver {
    channel: Channel,
    pub pid: u32,
}

impl TakenOver {
    /// Tells the new daemon that this one no longer accepts and no longer reads the QUIC
    /// sockets. The connection stays open until this process exits, which is how the new
    /// daemon learns that it is gone.
    pub async fn released(&self, quic_closed: u64) -> Result<(), ChannelError> {
        self.channel
            .send(&Message::Released { quic_closed }, &[])
            .await
    }
}

/// Who this daemon is, for a hello to match.
pub struct Identity {
    pub node: String,
    /// The layout of the maps (`capture/layout.rs`).
    pub layout: String,
    pub proxy_cgroup: u64,
}

/// Answers new daemons on `listener` until one takes over; then sends it on `done` and
/// returns.
pub async fn serve(
    listener: Listener,
    sockets: Arc<Sockets>,
    gate: Gate,
    me: Identity,
    done: oneshot::Sender<TakenOver>,
) {
    loop {
        let channel = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "handoff: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match hand_over(&channel, &sockets, &gate, &me).await {
            Ok(pid) => {
                gate.set(Phase::TakenOver);
                // The socket path is the new daemon's to listen on now.
                tracing::info!(
                    pid,
                    "taken over by a new mesh-node; no longer accepting, draining"
                );
                let _ = done.send(TakenOver { channel, pid });
                return;
            }
            Err(e) => {
                // Said before carrying on, so that the new daemon cannot take the silence for
                // this one's exit and run beside it.
                let reason = e.to_string();
                let _ = channel.send(&Message::Refused { reason }, &[]).await;
                if gate.pausing() {
                    gate.set(Phase::Running);
                    tracing::warn!(error = %e, "the new mesh-node did not take over; carrying on");
                } else {
                    tracing::warn!(error = %e, "handoff refused");
                }
            }
        }
    }
}

/// Why a hello is refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("handoff version {0} is not this daemon's {VERSION}")]
    Version(u32),
    #[error("this daemon runs as node {mine:?}, not {theirs:?}")]
    Node { mine: String, theirs: String },
    #[error("this daemon's maps have layout {mine}, the new one's {theirs}: a layout change is not handed over; stop this daemon, then start the new one")]
    Layout { mine: String, theirs: String },
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the reconciler did not pause within {PAUSE_TIMEOUT:?}")]
    Busy,
    #[error("the new daemon was not up within {READY_TIMEOUT:?} of its hello")]
    NotReady,
    #[error("this daemon is stopping")]
    Stopping,
    #[error("the new daemon does not read the offers")]
    Stalled,
}

impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Self {
        Refusal::Channel(ChannelError::Io(e))
    }
}

/// One new daemon: its hello, the offers, its readiness. The pid of the daemon that took
/// over, or why it did not.
async fn hand_over(
    channel: &Channel,
    sockets: &Sockets,
    gate: &Gate,
    me: &Identity,
) -> Result<u32, Refusal> {
    let (hello, _) = channel.recv(HELLO_TIMEOUT).await?;
    let hello_at = tokio::time::Instant::now();
    let pid = match hello {
        Message::Hello {
            version,
            pid,
            node,
            layout,
        } => {
            if version != VERSION {
                return Err(Refusal::Version(version));
            }
            if node != me.node {
                return Err(Refusal::Node {
                    mine: me.node.clone(),
                    theirs: node,
                });
            }
            if layout != me.layout {
                return Err(Refusal::Layout {
                    mine: me.layout.clone(),
                    theirs: layout,
                });
            }
            pid
        }
        other => {
            return Err(Refusal::Unexpected {
                expected: "a hello",
                got: format!("{other:?}"),
            })
        }
    };
    if gate.phase() != Phase::Running {
        return Err(Refusal::Stopping);
    }
    tracing::info!(
        pid,
        "a new mesh-node asks to take over; pausing config, then handing over the sockets"
    );
    gate.set(Phase::Pausing);
    // Nothing is offered while the reconciler may still bind or unenroll.
    tokio::time::timeout(PAUSE_TIMEOUT, gate.reached(Phase::Paused))
        .await
        .map_err(|_| Refusal::Busy)?;
    let held = sockets.held()?;
    let mut chunks = held.chunks(MAX_FDS).peekable();
    let proxy_cgroup = me.proxy_cgroup;
    if chunks.peek().is_none() {
        channel
            .send(
                &Message::Offer {
                    proxy_cgroup,
                    items: Vec::new(),
                    more: false,
                },
                &[],
            )
            .await?;
    }
    while let Some(chunk) = chunks.next() {
        let items = chunk.iter().map(|(item, _)| *item).collect();
        let fds: Vec<_> = chunk
            .iter()
            .map(|(_, fd)| std::os::fd::AsFd::as_fd(fd))
            .collect();
        let more = chunks.peek().is_some();
        let offer = Message::Offer {
            proxy_cgroup,
            items,
            more,
        };
        tokio::time::timeout(SEND_TIMEOUT, channel.send(&offer, &fds))
            .await
            .map_err(|_| Refusal::Stalled)??;
    }
    drop(held);
    let left = READY_TIMEOUT.saturating_sub(hello_at.elapsed());
    match channel.recv(left).await {
        Ok((Message::Ready, _)) => Ok(pid),
        Ok((other, _)) => Err(Refusal::Unexpected {
            expected: "ready",
            got: format!("{other:?}"),
        }),
        Err(ChannelError::Timeout(_)) => Err(Refusal::NotReady),
        Err(e) => Err(e.into()),
    }
}
