//! Where the running daemon is in a handoff. The reconciler stops applying config while a new
//! daemon starts up on the handed-over sockets (the kernel maps then have one writer), and
//! the daemon shuts down once it has been taken over.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// A new daemon asks to take over: the reconciler is to finish what it is doing and
    /// pause (it then sets `Paused`).
    Pausing,
    /// The reconciler is idle; a new daemon has (or is getting) the sockets and starts up.
    Paused,
    /// The new daemon runs; this one stops accepting and drains.
    TakenOver,
    /// This daemon is stopping: it hands over to nobody any more.
    Stopping,
}

#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<Phase>>);

impl Default for Gate {
    fn default() -> Self {
        Self(Arc::new(watch::channel(Phase::Running).0))
    }
}

impl Gate {
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    pub fn set(&self, phase: Phase) {
        self.0.send_replace(phase);
    }

    /// Returns once the phase is `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|p| *p == phase).await;
    }

    /// Returns once the phase is neither `Pausing` nor `Paused`.
    pub async fn resumed(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx
            .wait_for(|p| !matches!(p, Phase::Pausing | Phase::Paused))
            .await;
    }

    /// Returns once a handoff is asked for (or this daemon is past handing over). Any phase
    /// but `Running` counts: the reconciler may turn `Pausing` into `Paused` before a waiter
    /// looks.
    pub async fn left_running(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|p| *p != Phase::Running).await;
    }

    /// Whether a handoff is under way (asked for, or paused for).
    pub fn pausing(&self) -> bool {
        matches!(self.phase(), Phase::Pausing | Phase::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_see_the_phase_they_wait_for() {
        let gate = Gate::default();
        gate.set(Phase::Paused);
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.resumed().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        gate.set(Phase::TakenOver);
        waiter.await.unwrap();
        gate.reached(Phase::TakenOver).await;
    }
}
