//! When a netns's return routing is made and when it goes. It is made when a pod in the netns
//! is enrolled; it goes once the pod has left the mesh *and* the last transparent connection
//! into the netns has ended: until then the application's answers on those connections still
//! need the route back to the proxy (without it they would leave by the pod's interface).
//! A daemon that stops (restart, upgrade) leaves it, as it leaves the pods captured.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
};

use super::{
    routing::{self, SetUpError},
    Families,
};
use crate::{capture::Capture, netns::NetnsWorker};

/// The return routing of every netns this daemon enrolled a pod in.
pub struct Routes {
    /// Where the pods' net sysctls are written (`--net-sysctl-dir`).
    sysctl_dir: PathBuf,
    /// Where the sysctls turned on are recorded (the pod's `ENROLLED` entry).
    capture: Arc<Capture>,
    by_netns: Mutex<HashMap<u64, Arc<NetnsRoutes>>>,
}

/// One netns's return routing.
pub struct NetnsRoutes {
    cookie: u64,
    worker: NetnsWorker,
    routes: Weak<Routes>,
    /// Set-up and tear-down of this netns, one at a time, in order.
    ops: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// The families routed now (`Families::bits`); 0 before set-up and after tear-down.
    families: AtomicU8,
}

#[derive(Default)]
struct State {
    /// A pod in the netns is enrolled.
    enrolled: bool,
    /// Transparent connections open into the netns.
    connections: usize,
    /// The sysctls to turn off again (`ENROLLED_*` flags), known once the pod left.
    turned_on: u32,
    /// Being torn down (or torn down): new connections do not count on it.
    retired: bool,
}

impl Routes {
    pub fn new(sysctl_dir: PathBuf, capture: Arc<Capture>) -> Arc<Self> {
        Arc::new(Self {
            sysctl_dir,
            capture,
            by_netns: Mutex::default(),
        })
    }

    /// Sets up the return routing of the netns `cookie` (whose thread is `worker`) for a pod
    /// that is being enrolled; the netns's entry, which transparent connections count on.
    pub async fn enrol(
        self: &Arc<Self>,
        cookie: u64,
        worker: &NetnsWorker,
    ) -> Result<Arc<NetnsRoutes>, SetUpError> {
        let netns = self
            .lock()
            .entry(cookie)
            .or_insert_with(|| {
                Arc::new(NetnsRoutes {
                    cookie,
                    worker: worker.clone(),
                    routes: Arc::downgrade(self),
                    ops: tokio::sync::Mutex::new(()),
                    state: Mutex::default(),
                    families: AtomicU8::new(0),
                })
            })
            .clone();
        let op = netns.ops.lock().await;
        {
            // A tear-down that held `ops` before us has finished: this entry is set up again.
            let mut state = netns.lock();
            state.enrolled = true;
            state.retired = false;
        }
        // A tear-down that held `ops` before us may have taken the entry out.
        self.lock().entry(cookie).or_insert_with(|| netns.clone());
        let (dir, capture) = (self.sysctl_dir.clone(), self.capture.clone());
        let record = move |flags| {
            capture
                .add_enrollment_flags(cookie, flags)
                .map_err(|e| e.to_string())
        };
        let made = netns
            .worker
            .run(move || routing::set_up(&dir, record))
            .await?;
        let families = made?;
        netns.families.store(families.bits(), Ordering::Release);
        drop(op);
        Ok(netns)
    }

    /// The pod in the netns `cookie` left the mesh; `turned_on` is what its `ENROLLED` entry
    /// said was turned on. The routing goes now, or when the last connection into the netns
    /// ends.
    pub async fn leave(&self, cookie: u64, turned_on: u32) {
        let Some(netns) = self.lock().get(&cookie).cloned() else {
            return;
        };
        {
            let mut state = netns.lock();
            state.enrolled = false;
            state.turned_on |= turned_on;
        }
        netns.tear_down_if_unused().await;
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<NetnsRoutes>>> {
        self.by_netns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NetnsRoutes {
    /// The families whose connections can be made transparent now.
    pub fn families(&self) -> Families {
        Families::from_bits(self.families.load(Ordering::Acquire))
    }

    /// Counts a transparent connection into this netns until the guard is dropped; `None`
    /// once the routing is going (the connection is made from the pod's address instead).
    pub fn in_use(self: &Arc<Self>) -> Option<InUse> {
        let mut state = self.lock();
        if state.retired {
            return None;
        }
        state.connections += 1;
        Some(InUse(self.clone()))
    }

    async fn tear_down_if_unused(self: Arc<Self>) {
        let _op = self.ops.lock().await;
        let Some(routes) = self.routes.upgrade() else {
            return;
        };
        // An entry the registry no longer holds was torn down already; the netns may have
        // another, whose routing is not this one's to remove.
        let current = |routes: &Routes| {
            routes
                .lock()
                .get(&self.cookie)
                .is_some_and(|n| Arc::ptr_eq(n, &self))
        };
        if !current(&routes) {
            return;
        }
        let turned_on = {
            let mut state = self.lock();
            if state.enrolled || state.connections > 0 {
                return;
            }
            state.retired = true;
            state.turned_on
        };
        self.families.store(0, Ordering::Release);
        let dir = routes.sysctl_dir.clone();
        if let Err(e) = self
            .worker
            .run(move || routing::tear_down(&dir, turned_on))
            .await
        {
            tracing::warn!(cookie = self.cookie, error = %e, "cannot remove a pod's return routing");
        }
        routes.lock().remove(&self.cookie);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A transparent connection into a netns, counted while it is open.
pub struct InUse(Arc<NetnsRoutes>);

impl Drop for InUse {
    fn drop(&mut self) {
        let unused = {
            let mut state = self.0.lock();
            state.connections -= 1;
            state.connections == 0 && !state.enrolled
        };
        if unused {
            // The last connection of a pod that left: its routing can go now. Outside a
            // runtime (the process is ending) it stays, as a stopping daemon leaves it.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(self.0.clone().tear_down_if_unused());
            }
        }
    }
}
