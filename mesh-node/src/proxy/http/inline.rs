//! What hyper spawns for an application's HTTP/2 connection (on `h2c` and `grpc` ports) runs
//! in the task that drives it.
//!
//! hyper's HTTP/2 server spawns a task per stream. As separate tasks they undo the batching
//! HTTP/2 gives: a task that wakes another runs it next, so eight requests read in one go
//! went upstream in eight writes, one per request, each its own record and segment. Run
//! inside the connection's task, the streams woken by one read are polled together, and
//! what they queue goes out in one flush. The price: one connection's streams share a
//! thread, as their frames share a socket anyway. A stream that panics is dropped alone, as
//! a task of its own would be.
//!
//! The queue is a plain mutex, not a tokio channel: tokio's channels count toward a task's
//! budget of operations per poll, and past it claim to be empty while they are not.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::{pin, Pin},
    sync::{Arc, Mutex},
    task::Poll,
};

use futures_util::{stream::FuturesUnordered, task::AtomicWaker, FutureExt as _, StreamExt as _};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds of (spawned futures, then the connection) in one poll before the task lets others
/// run: a peer that keeps the connection busy does not keep the thread.
const ROUNDS: usize = 8;

/// hyper's executor for one connection: futures go to [`drive`], or to the runtime once the
/// connection's task has ended.
#[derive(Clone)]
pub struct Inline(Arc<Queue>);

struct Queue {
    /// `None` once the driving task has ended.
    tasks: Mutex<Option<Vec<Task>>>,
    waker: AtomicWaker,
}

impl<F> hyper::rt::Executor<F> for Inline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let task: Task = Box::pin(AssertUnwindSafe(fut).catch_unwind().map(|ended| {
            if ended.is_err() {
                tracing::error!("an HTTP/2 stream's task panicked; the stream was dropped");
            }
        }));
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|p| p.into_inner());
        match tasks.as_mut() {
            Some(queued) => {
                queued.push(task);
                drop(tasks);
                self.0.waker.wake();
            }
            None => {
                drop(tasks);
                tokio::spawn(task);
            }
        }
    }
}

/// An executor for a connection, and what [`drive`] takes to run what is given to it.
pub fn executor() -> (Inline, Spawned) {
    let queue = Arc::new(Queue {
        tasks: Mutex::new(Some(Vec::new())),
        waker: AtomicWaker::new(),
    });
    (Inline(queue.clone()), Spawned(queue))
}

/// The futures given to an [`Inline`] executor. Dropped (the driving task ended or was
/// cut), it sends what comes later to the runtime.
pub struct Spawned(Arc<Queue>);

impl Spawned {
    fn take(&self) -> Vec<Task> {
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Dropped outside the lock: a future's drop may give the executor another.
        let queued = self
            .0
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(queued);
    }
}

/// Drives `conn` and what it spawned through its executor, until the connection ends and
/// the futures it spawned have too; returns the connection's result.
pub async fn drive<C: Future>(conn: C, spawned: Spawned) -> C::Output {
    // Dropped as soon as it is done: what it holds may be what its spawned futures wait on
    // to end.
    let mut conn = pin!(Some(conn));
    let mut out = None;
    let mut tasks = FuturesUnordered::<Task>::new();
    std::future::poll_fn(move |cx| {
        spawned.0.waker.register(cx.waker());
        for _ in 0..ROUNDS {
            tasks.extend(spawned.take());
            // Every stream woken since the last time, and the new ones; Pending once none
            // is ready (or after a round, with this task woken again).
            let idle = loop {
                match tasks.poll_next_unpin(cx) {
                    Poll::Ready(Some(())) => {}
                    Poll::Ready(None) => break true,
                    Poll::Pending => break false,
                }
            };
            // After the streams: what they queued is written in this poll.
            if let Some(running) = conn.as_mut().as_pin_mut() {
                if let Poll::Ready(o) = running.poll(cx) {
                    out = Some(o);
                    conn.set(None);
                }
            }
            let queued = spawned
                .0
                .tasks
                .lock()
                .is_ok_and(|t| t.as_ref().is_some_and(|t| !t.is_empty()));
            if queued {
                continue;
            }
            return match out.take() {
                Some(o) if idle => Poll::Ready(o),
                taken => {
                    out = taken;
                    Poll::Pending
                }
            };
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn the_connection_ends_after_what_it_spawned() {
        let (exec, spawned) = executor();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let conn = {
            let (exec, done) = (exec.clone(), done.clone());
            async move {
                // A stream that outlives the connection's own future, and one it spawns.
                exec.execute({
                    let (exec, done) = (exec.clone(), done.clone());
                    async move {
                        let _ = rx.await;
                        done.fetch_add(1, Ordering::SeqCst);
                        exec.execute(async move {
                            done.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                });
                7
            }
        };
        let driven = tokio::spawn(drive(conn, spawned));
        tokio::task::yield_now().await;
        assert!(!driven.is_finished(), "it waits for the stream");
        tx.send(()).ok();
        assert_eq!(driven.await.ok(), Some(7));
        assert_eq!(done.load(Ordering::SeqCst), 2);
        // Once the connection's task is gone, what is given to its executor still runs.
        let (late, rx) = tokio::sync::oneshot::channel();
        exec.execute(async move {
            late.send(()).ok();
        });
        assert_eq!(rx.await.ok(), Some(()));
    }

    /// A finished future that still holds what its spawned work waits on (as hyper's HTTP/2
    /// client does): dropping it lets the work end.
    struct Holds(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

    impl Future for Holds {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
    }

    #[tokio::test]
    async fn a_finished_connection_is_dropped_before_its_streams_are_waited_for() {
        let (exec, spawned) = executor();
        let (held, gone) = tokio::sync::oneshot::channel::<()>();
        exec.execute(async move {
            let _ = gone.await;
        });
        let driven = drive(Holds(held), spawned);
        let ended = tokio::time::timeout(Duration::from_secs(5), driven).await;
        assert!(
            ended.is_ok(),
            "the stream waited on the finished connection"
        );
    }

    /// As many streams as a client may open (256), opened in one read: a tokio channel
    /// would stop handing them over past the task's budget.
    #[tokio::test]
    async fn hundreds_of_streams_spawned_at_once_all_run() {
        let (exec, spawned) = executor();
        let done = Arc::new(AtomicUsize::new(0));
        let conn = {
            let done = done.clone();
            async move {
                for _ in 0..300 {
                    let done = done.clone();
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(5), drive(conn, spawned)).await;
        assert!(ended.is_ok(), "not every stream ran");
        assert_eq!(done.load(Ordering::SeqCst), 300);
    }

    #[tokio::test]
    async fn a_stream_that_panics_is_dropped_alone() {
        let (exec, spawned) = executor();
        let (tx, rx) = tokio::sync::oneshot::channel();
        exec.execute(async {
            panic!("a stream's bug");
        });
        exec.execute(async move {
            tokio::task::yield_now().await;
            tx.send(()).ok();
        });
        let ended = tokio::time::timeout(Duration::from_secs(5), drive(async {}, spawned)).await;
        assert!(ended.is_ok());
        assert_eq!(rx.await.ok(), Some(()));
    }
}
