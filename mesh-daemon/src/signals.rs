//! SIGTERM and SIGINT, the two signals that stop a daemon cleanly.

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, SignalKind};

/// A parent may have started us with SIGTERM and SIGINT blocked (a supervisor that waits for
/// them with sigwait, say): the clean stop depends on them, so take them back. Call first in
/// `main`, before any thread starts, so every thread inherits the mask.
pub fn unblock_stop_signals() {
    let stop = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT]);
    // Fails only for an invalid `how`; there is nothing better to do than run on.
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&stop), None);
}

#[derive(Debug, thiserror::Error)]
#[error("cannot handle {signal}")]
pub struct SignalError {
    signal: &'static str,
    #[source]
    source: std::io::Error,
}

/// Waits for SIGTERM or SIGINT. From the moment it is made these signals no longer end the
/// process at once, so make it before the daemon says it is ready: a supervisor may send
/// SIGTERM as soon as it reads that line.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> Result<Self, SignalError> {
        let handle = |kind, name| {
            signal(kind).map_err(|source| SignalError {
                signal: name,
                source,
            })
        };
        Ok(Self {
            term: handle(SignalKind::terminate(), "SIGTERM")?,
            int: handle(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Completes at the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sigint_is_received() {
        unblock_stop_signals();
        let mut signals = Signals::new().map_err(|e| e.to_string()).unwrap();
        // Installed above: the default action (exit) no longer applies to this process.
        nix::sys::signal::raise(Signal::SIGINT).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), signals.recv())
            .await
            .expect("SIGINT not received");
    }
}
