//! The policy the kernel enforces for this node's pods, before any byte reaches the proxy:
//! fast-deny entries that refuse a connect in the pod's own connect hook, and the inbound
//! program's mTLS mode with the ports it lets plaintext through to.
//!
//! The node reconciler (`node/`) sets the mode before it enrolls a version's pods and the
//! fast-deny entries after, both before it acknowledges the version; the proxy's own check on
//! every delivery is `authz.rs`.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use mesh_ebpf_common::{INBOUND_PERMISSIVE, INBOUND_STRICT};
use mesh_model::{LocalHop, MtlsMode};

use crate::{capture::Capture, workloads::WorkloadId};

/// The kernel maps' policy entries; one per daemon, owned by the node reconciler.
pub struct KernelPolicy {
    capture: Arc<Capture>,
    /// The inbound program's mode in force (the mesh's mTLS mode); 0 until the first config.
    inbound_mode: u32,
    /// The local hop last applied; `None` until the first config applies one (the daemon
    /// starts with the hop's switch off).
    local_hop: Option<LocalHop>,
}

impl KernelPolicy {
    pub fn new(capture: Arc<Capture>) -> Self {
        Self {
            capture,
            inbound_mode: 0,
            local_hop: None,
        }
    }

    /// Puts the fast-deny entries of the enrolled pods (`pods`: each pod and its netns
    /// cookie; `entries`: destinations by pod, port 0 for every port) into the kernel, and
    /// removes those of pods no longer enrolled.
    pub fn sync_fast_deny<'a>(
        &self,
        pods: impl IntoIterator<Item = (&'a WorkloadId, u64)>,
        entries: &BTreeMap<WorkloadId, Vec<(IpAddr, u16)>>,
    ) {
        let desired = pods
            .into_iter()
            .filter_map(|(id, cookie)| Some((cookie, entries.get(id)?)))
            .flat_map(|(cookie, list)| {
                list.iter()
                    .map(move |(ip, port)| crate::capture::fast_deny_key(cookie, *ip, *port))
            })
            .collect();
        let update = self.capture.set_fast_deny(&desired);
        if update.failed > 0 {
            tracing::warn!(
                failed = update.failed, held = update.held,
                "fast-deny entries did not fit the kernel map; those connects are refused by the destination instead"
            );
        } else if update.added + update.removed > 0 {
            tracing::info!(
                added = update.added,
                removed = update.removed,
                held = update.held,
                "fast-deny entries updated"
            );
        }
    }

    /// Applies the mesh's `localHop` to connections from now on. Where the socket map cannot
    /// be used, the hop stays on TCP, with a warning once per change.
    pub fn set_local_hop(&mut self, hop: LocalHop) {
        if self.local_hop == Some(hop) {
            return;
        }
        let applied = self.capture.set_local_hop(hop == LocalHop::Sockmap);
        // Unavailable is for good: said once. Any other failure is tried again next config.
        if applied
            .as_ref()
            .map_or_else(|e| e.is_permanent(), |()| true)
        {
            self.local_hop = Some(hop);
        }
        match applied {
            Ok(()) if hop == LocalHop::Sockmap => tracing::warn!(
                local_hop = %hop,
                "pod-local hop through the socket map (experimental) for new connections: the kernel applies no backpressure there"
            ),
            Ok(()) => tracing::info!(local_hop = %hop, "pod-local hop applied to new connections"),
            Err(e) => tracing::warn!(error = %e, "the pod-local hop stays on loopback TCP"),
        }
    }

    /// Applies the mesh's mTLS mode to plaintext to the pods and opens the tunnel port plus
    /// `plaintext_ports` to it. Errors are logged; the previous settings then stay in force.
    pub fn set_inbound(&mut self, mode: MtlsMode, plaintext_ports: &[u16]) {
        let flags = match mode {
            MtlsMode::Strict => INBOUND_STRICT,
            MtlsMode::Permissive => INBOUND_PERMISSIVE,
        };
        let open: HashSet<u16> = plaintext_ports
            .iter()
            .copied()
            .chain([crate::tunnel::TUNNEL_PORT])
            .collect();
        let update = self.capture.set_open_ports(&open);
        if update.failed > 0 {
            tracing::error!(
                failed = update.failed,
                "cannot update the open plaintext ports in the kernel"
            );
        }
        if flags == self.inbound_mode {
            return;
        }
        if let Err(e) = self.capture.set_inbound_mode(flags) {
            tracing::error!(error = %e, "cannot apply the mTLS mode");
            return;
        }
        self.inbound_mode = flags;
        let mut open: Vec<u16> = open.into_iter().collect();
        open.sort_unstable();
        tracing::info!(mode = %mode, open_ports = ?open, "plaintext to mesh pods: mTLS mode applied");
    }
}
