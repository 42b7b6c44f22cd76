//! Leader election among the replicas that share a store, by an etcd lease: the leader does
//! what must happen once (today, making the CA when the store has none). Every replica
//! serves nodes and signs certificates whether it leads or not.
//!
//! The leader holds `PREFIX/leader` (its name) attached to a lease it renews every
//! [`Timing::renew`]; when it stops renewing (it died, or lost etcd), etcd removes the key
//! once the lease's [`Timing::ttl`] runs out, and the next replica to look takes it. A leader
//! counts itself one only until its lease could end (its time counted from before the
//! renewal, less a margin), and steps down at once when a renewal fails or is late, letting
//! the lease go: two leaders never act together.

use std::time::Duration;

use mesh_etcd::{
    ops,
    pb::{response_op, TxnRequest},
};
use tokio::sync::watch;

use super::Store;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the lease lasts without renewal, in seconds.
    pub ttl: i64,
    /// How often the leader renews, and the others look.
    pub renew: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ttl: 10,
            renew: Duration::from_secs(3),
        }
    }
}

/// This replica's part in the election, running.
pub struct Election {
    /// Whether this replica leads now.
    pub leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Takes part in the election as `identity` until [`Election::stop`].
    pub fn start(store: Store, identity: String, timing: Timing) -> Self {
        let (elected, leader) = watch::channel(false);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(store, identity, timing, elected, stopped));
        Self { leader, stop, task }
    }

    /// Leaves the election: a leader lets its lease go, so that another replica leads at
    /// once rather than when the lease runs out. Waits for that at most the time of one
    /// call to etcd.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(6), self.task).await;
    }
}

/// Takes part in the election as `identity` until `stop` says so; `leader` says whether this
/// replica leads now.
async fn run(
    store: Store,
    identity: String,
    timing: Timing,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let key = store.layout.leader();
    let mut lease: Option<i64> = None;
    // Until when this replica may call itself the leader: the lease's time counted from
    // before the renewal that granted it, less a margin. Etcd may end the lease at any moment
    // after that, and another replica take the key.
    let mut until: Option<tokio::time::Instant> = None;
    let ttl = Duration::from_secs(u64::try_from(timing.ttl).unwrap_or(1));
    let margin = timing.renew.min(ttl / 3);
    loop {
        let sent = tokio::time::Instant::now();
        let attempt = attempt(&store, &key, &identity, &mut lease, timing.ttl);
        let outcome = match until {
            // A renewal slower than the lease has left is not waited for.
            Some(deadline) => tokio::select! {
                r = attempt => Some(r),
                () = tokio::time::sleep_until(deadline) => None,
            },
            None => Some(attempt.await),
        };
        let leads = match outcome {
            Some(Ok(true)) => {
                until = Some(sent + ttl - margin);
                true
            }
            // Another holds the key: this lease is kept for the next try.
            Some(Ok(false)) => false,
            Some(Err(e)) => {
                if *leader.borrow() {
                    tracing::warn!(error = %e, "cannot renew the leader lease: stepping down");
                }
                // Whatever its state, a new lease is taken next time.
                drop_lease(&store, &mut lease).await;
                false
            }
            None => {
                tracing::warn!("the leader lease was not renewed in time: stepping down");
                drop_lease(&store, &mut lease).await;
                false
            }
        };
        if !leads {
            until = None;
        }
        set(&leader, leads, &identity);
        if *stop.borrow() {
            break;
        }
        match until {
            // The next renewal is due before the lease could end, or leadership ends there.
            Some(deadline) => tokio::select! {
                () = tokio::time::sleep(timing.renew) => {}
                _ = stop.changed() => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("the leader lease was not renewed in time: stepping down");
                    until = None;
                    set(&leader, false, &identity);
                    drop_lease(&store, &mut lease).await;
                }
            },
            None => tokio::select! {
                () = tokio::time::sleep(timing.renew) => {}
                _ = stop.changed() => {}
            },
        }
        if *stop.borrow() {
            break;
        }
    }
    if *leader.borrow() {
        tracing::info!(identity, "stopping: letting the leader lease go");
    }
    set(&leader, false, &identity);
    drop_lease(&store, &mut lease).await;
}

/// Lets the lease go, at once if etcd answers (within its timeout), so that another replica
/// need not wait for it to run out.
async fn drop_lease(store: &Store, lease: &mut Option<i64>) {
    if let Some(id) = lease.take() {
        let _ = store.client.revoke(id).await;
    }
}

fn set(leader: &watch::Sender<bool>, leads: bool, identity: &str) {
    if leader.send_replace(leads) != leads {
        match leads {
            true => tracing::info!(identity, "leading the control-plane replicas"),
            false => tracing::info!(identity, "no longer leading"),
        }
    }
}

/// Renews (or takes) the lease, then takes the key if it is free; whether this replica
/// holds it.
async fn attempt(
    store: &Store,
    key: &str,
    identity: &str,
    lease: &mut Option<i64>,
    ttl: i64,
) -> Result<bool, mesh_etcd::Error> {
    let client = &store.client;
    if let Some(id) = *lease {
        if client.keep_alive(id).await? <= 0 {
            *lease = None;
        }
    }
    let id = match *lease {
        Some(id) => id,
        None => {
            let id = client.grant(ttl).await?;
            *lease = Some(id);
            id
        }
    };
    let answer = client
        .txn(TxnRequest {
            compare: vec![ops::absent(key.as_bytes())],
            success: vec![ops::put(key.as_bytes(), identity.as_bytes().to_vec(), id)],
            failure: vec![ops::get(key.as_bytes())],
        })
        .await?;
    if answer.succeeded {
        return Ok(true);
    }
    // Held already: by this replica's lease (it took it earlier), or another's.
    let holder = answer.responses.into_iter().find_map(|r| match r.response {
        Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
        _ => None,
    });
    Ok(holder.is_some_and(|kv| kv.lease == id))
}
