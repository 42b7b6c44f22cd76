//! The starting daemon's side: asks the running one for its sockets, and once up on them,
//! tells it to stop.

use std::{path::Path, sync::Arc, time::Duration};

use super::{
    channel::{Channel, ChannelError},
    protocol::{Message, ProtocolError, VERSION},
    sockets::Sockets,
};

/// How long each offer may take to arrive.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old daemon may take to stop accepting and close its QUIC connections.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long this daemon may take, from its hello, to be up on the sockets; past it, it gives
/// up (the old daemon waits longer from the same moment, [`super::old::READY_TIMEOUT`], then
/// carries on).
pub const READY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the running mesh-node refused the handoff: {0}")]
    Refused(String),
    #[error("the running mesh-node said {0} during the handoff")]
    Unexpected(String),
}

/// A handoff under way: this daemon holds the old one's sockets and starts up on them.
pub struct Takeover {
    channel: Channel,
    /// When this daemon said hello: [`READY_WITHIN`] counts from then.
    pub asked_at: std::time::Instant,
    /// The old daemon's pid.
    pub old_pid: Option<u32>,
    /// The old daemon's cgroup id, exempt from capture while it drains.
    pub old_cgroup: u64,
    /// Descriptors handed over and refused (each with why).
    pub refused: Vec<String>,
}

/// What the old daemon did when it let go.
pub struct Released {
    channel: Channel,
    pub quic_closed: u64,
}

impl Released {
    /// Returns when the old daemon has exited (its end of the connection closed).
    pub async fn exited(self) {
        loop {
            match self.channel.recv(Duration::from_secs(3600)).await {
                Err(ChannelError::Timeout(_)) => continue,
                _ => return,
            }
        }
    }
}

/// Asks the daemon listening at `path` for its sockets, filing them in `sockets`; this daemon
/// runs as `node` with maps of layout `layout`, which the old one checks. `None` when no
/// daemon answers there (none runs, or one that crashed left the file).
pub async fn ask(
    path: &Path,
    sockets: &Arc<Sockets>,
    node: &str,
    layout: &str,
) -> Result<Option<Takeover>, TakeoverError> {
    let channel = match Channel::connect(path).await {
        Ok(c) => c,
        Err(ChannelError::Socket { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT | libc::ECONNREFUSED)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let hello = Message::Hello {
        version: VERSION,
        pid: std::process::id(),
        node: node.to_owned(),
        layout: layout.to_owned(),
    };
    let asked_at = std::time::Instant::now();
    // 0 when the old daemon is in another pid namespace (another pod without hostPID).
    let old_pid = channel.peer_pid().filter(|pid| *pid != 0);
    channel.send(&hello, &[]).await?;
    let mut refused = Vec::new();
    // The first offer waits for the old daemon's reconciler to pause too.
    let mut wait = super::old::PAUSE_TIMEOUT + OFFER_TIMEOUT;
    loop {
        let (msg, fds) = channel.recv(wait).await?;
        wait = OFFER_TIMEOUT;
        match msg {
            Message::Offer {
                proxy_cgroup,
                items,
                more,
            } => {
                refused.extend(sockets.receive(items, fds));
                if !more {
                    return Ok(Some(Takeover {
                        channel,
                        asked_at,
                        old_pid,
                        old_cgroup: proxy_cgroup,
                        refused,
                    }));
                }
            }
            Message::Refused { reason } => return Err(TakeoverError::Refused(reason)),
            other => return Err(TakeoverError::Unexpected(format!("{other:?}"))),
        }
    }
}

impl Takeover {
    /// Tells the old daemon that this one is up, and waits for it to let go.
    pub async fn complete(self) -> Result<Released, TakeoverError> {
        self.channel.send(&Message::Ready, &[]).await?;
        match self.channel.recv(RELEASE_TIMEOUT).await?.0 {
            Message::Released { quic_closed } => Ok(Released {
                channel: self.channel,
                quic_closed,
            }),
            Message::Refused { reason } => Err(TakeoverError::Refused(reason)),
            other => Err(TakeoverError::Unexpected(format!("{other:?}"))),
        }
    }
}

impl From<ProtocolError> for TakeoverError {
    fn from(e: ProtocolError) -> Self {
        TakeoverError::Channel(ChannelError::Protocol(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::{
        channel::Listener,
        gate::{Gate, Phase},
        old,
        protocol::Item,
    };
    use std::os::fd::AsFd as _;

    #[tokio::test]
    async fn a_new_daemon_gets_the_sockets_and_the_old_one_lets_go() {
        let path = std::env::temp_dir().join(format!("mycel-takeover-{}.sock", std::process::id()));
        let listener = Listener::bind(&path).unwrap();
        let theirs = Arc::new(Sockets::default());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        theirs.hold(Item::Admin, l.as_fd()).unwrap();
        let gate = Gate::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let me = old::Identity {
            node: "n1".into(),
            layout: "maps-v1-aa".into(),
            proxy_cgroup: 42,
        };
        let g = gate.clone();
        tokio::spawn(old::serve(listener, theirs, gate.clone(), me, done_tx));
        // The reconciler's part: it pauses when asked.
        tokio::spawn(async move {
            g.reached(Phase::Pausing).await;
            g.set(Phase::Paused);
        });

        let ours = Arc::new(Sockets::default());
        // Another node's daemon, or another layout, is refused.
        for (node, layout) in [("n2", "maps-v1-aa"), ("n1", "maps-v2-bb")] {
            let refused = ask(&path, &ours, node, layout).await;
            assert!(
                matches!(refused, Err(TakeoverError::Refused(_))),
                "{node} {layout}"
            );
        }
        let takeover = ask(&path, &ours, "n1", "maps-v1-aa")
            .await
            .unwrap()
            .expect("a daemon answers");
        assert_eq!(takeover.old_pid, Some(std::process::id()));
        assert_eq!(takeover.old_cgroup, 42);
        assert!(takeover.refused.is_empty());
        assert_eq!(
            gate.phase(),
            Phase::Paused,
            "the old one stops applying config"
        );
        let taken = ours
            .take_listener(Item::Admin, l.local_addr().unwrap())
            .expect("the admin listener");
        assert_eq!(taken.local_addr().unwrap(), l.local_addr().unwrap());

        let completing = tokio::spawn(takeover.complete());
        let old = done_rx.await.expect("the old side hands over");
        assert_eq!(old.pid, std::process::id());
        assert_eq!(gate.phase(), Phase::TakenOver);
        old.released(3).await.unwrap();
        let released = completing.await.unwrap().unwrap();
        assert_eq!(released.quic_closed, 3);
        drop(old);
        tokio::time::timeout(Duration::from_secs(5), released.exited())
            .await
            .expect("the old one's exit is seen");
        let _ = std::fs::remove_file(&path);
    }

    /// Paused clock: the silent daemon's wait (its reconciler's pause plus an offer's time)
    /// passes at once.
    #[tokio::test(start_paused = true)]
    async fn no_daemon_means_no_handoff_and_a_silent_one_times_out() {
        let path =
            std::env::temp_dir().join(format!("mycel-takeover-none-{}.sock", std::process::id()));
        let ours = Arc::new(Sockets::default());
        assert!(ask(&path, &ours, "n", "l").await.unwrap().is_none());
        // A listener that never answers (a hung daemon): the hello goes unanswered.
        let _listener = Listener::bind(&path).unwrap();
        let outcome =
            tokio::time::timeout(Duration::from_secs(60), ask(&path, &ours, "n", "l")).await;
        assert!(
            matches!(
                outcome,
                Ok(Err(TakeoverError::Channel(ChannelError::Timeout(_))))
            ),
            "{:?}",
            outcome.map(|r| r.map(|t| t.is_some()))
        );
        let _ = std::fs::remove_file(&path);
    }
}
