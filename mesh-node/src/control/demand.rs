//! Other nodes' workloads on demand, the node's side: what the proxy asks for, and what the
//! config stream has asked the control plane to watch.
//!
//! The proxy sends a [`Lookup`] when a connection needs a workload the view does not hold
//! (a destination address, a Service's endpoint, a tunnel's source); the stream batches
//! them into `ConfigAck.watch`/`watch_addresses`, and the answer arrives as any update
//! does, in the view and from it the directory the proxy waits on. What was asked is kept
//! across streams ([`Asked`]) and named again when a stream starts.

use std::{
    collections::{BTreeSet, VecDeque},
    net::IpAddr,
};

use mesh_api::{
    keys,
    v1::{resource::Kind, ConfigAck, ConfigUpdate},
    MAX_WATCHES,
};
use tokio::sync::mpsc;

use super::MeshView;
use crate::workloads::WorkloadId;

/// What a connection needs that the view does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A workload by name: a Service's endpoint.
    Workload(WorkloadId),
    /// Whatever workload has this address: a destination, or a tunnel's source.
    Address(IpAddr),
}

/// The proxy's end: lookups go to the config stream. Cheap to clone.
pub type Lookups = mpsc::Sender<Lookup>;

/// Lookups queued at most between the proxy and the stream: a connection whose lookup does
/// not fit waits for room, as it waits for the answer.
pub const QUEUE: usize = 1024;

/// Addresses asked for at most: past it the oldest are released (`unwatch_addresses`), so
/// that a pod that reaches many addresses outside the mesh cannot fill the stream's watches;
/// one of them is asked for again when a connection needs it.
pub const MAX_ADDRESSES: usize = 8 << 10;

/// Workloads asked for by key at most. Each watched address may bring one more workload, and
/// mesh-cp counts those too: keys and addresses asked, and the workloads found through the
/// addresses, stay within [`MAX_WATCHES`]. A node whose pods use more other workloads than
/// this should hold every workload (no `--workloads-on-demand`).
pub const MAX_KEYS: usize = MAX_WATCHES - 2 * MAX_ADDRESSES;
const _: () = assert!(MAX_KEYS + 2 * MAX_ADDRESSES <= MAX_WATCHES && MAX_KEYS > MAX_ADDRESSES);

/// Most lookups one message carries.
const BATCH: usize = 1024;

/// What this node has asked the control plane to watch, kept across streams.
#[derive(Debug, Default)]
pub struct Asked {
    keys: BTreeSet<String>,
    addresses: BTreeSet<IpAddr>,
    /// `addresses` in the order they were asked, oldest first.
    order: VecDeque<IpAddr>,
    /// Asked and not answered yet: asked again on a stream that resumes (a stream that
    /// broke may have lost the answer; a snapshot answers everything watched).
    unanswered_keys: BTreeSet<String>,
    unanswered_addresses: BTreeSet<IpAddr>,
    /// Whether the bound on keys was met (logged once).
    full: bool,
}

impl Asked {
    /// What a new stream names first: every other node's workload `view` holds, every key
    /// and address asked for. A resuming stream is filtered by exactly this.
    pub fn all(&self, view: &MeshView, node: &str) -> ConfigAck {
        let mut keys: BTreeSet<String> = self.keys.clone();
        keys.extend(
            view.workloads
                .iter()
                .filter(|(_, w)| w.node != node)
                .map(|(id, _)| keys::workload(&id.namespace, &id.name)),
        );
        mesh_api::watch(keys, self.addresses.iter().copied())
    }

    /// What was asked and not answered, to ask again after a resume; `None` if nothing.
    pub fn unanswered(&self) -> Option<ConfigAck> {
        let message = mesh_api::watch(
            self.unanswered_keys.iter().cloned(),
            self.unanswered_addresses.iter().copied(),
        );
        (!message.watch.is_empty() || !message.watch_addresses.is_empty()).then_some(message)
    }

    /// Takes note of what `update` answers: the workloads it brings (by key and by their
    /// addresses), the keys it removes, the addresses it names absent.
    pub fn answered_by(&mut self, update: &ConfigUpdate) {
        if self.unanswered_keys.is_empty() && self.unanswered_addresses.is_empty() {
            return;
        }
        for r in &update.upserts {
            if let Some(Kind::Workload(w)) = &r.kind {
                self.unanswered_keys.remove(&r.key);
                for a in w
                    .addresses
                    .iter()
                    .filter_map(|a| mesh_api::ip_from_bytes(a))
                {
                    self.unanswered_addresses.remove(&a.to_canonical());
                }
            }
        }
        for key in &update.removals {
            self.unanswered_keys.remove(key);
        }
        for a in update
            .absent
            .iter()
            .filter_map(|a| mesh_api::ip_from_bytes(a))
        {
            self.unanswered_addresses.remove(&a.to_canonical());
        }
    }

    /// A message asking for what `lookups` name that is neither held in `view` nor asked
    /// already, releasing the oldest addresses past [`MAX_ADDRESSES`] (also dropped from
    /// `view`'s absent set, so that a connection asks again); `None` when there is nothing
    /// to ask. Keys past [`MAX_KEYS`] are not asked (their connections are refused as
    /// unresolved, or a Service goes on with the endpoints it has).
    pub fn ask(
        &mut self,
        lookups: impl IntoIterator<Item = Lookup>,
        view: &mut MeshView,
    ) -> Option<ConfigAck> {
        let mut message = ConfigAck::default();
        for lookup in lookups {
            match lookup {
                Lookup::Workload(id) => {
                    let key = keys::workload(&id.namespace, &id.name);
                    if view.workloads.contains_key(&id) || self.keys.contains(&key) {
                        continue;
                    }
                    if self.keys.len() >= MAX_KEYS {
                        if !std::mem::replace(&mut self.full, true) {
                            tracing::warn!(
                                asked = self.keys.len(),
                                "this node has asked for {MAX_KEYS} other workloads, the most on demand; more are not asked for (run it without --workloads-on-demand to hold every workload)"
                            );
                        }
                        continue;
                    }
                    self.keys.insert(key.clone());
                    self.unanswered_keys.insert(key.clone());
                    message.watch.push(key);
                }
                Lookup::Address(ip) => {
                    let ip = ip.to_canonical();
                    if view.absent.contains(&ip) || !self.addresses.insert(ip) {
                        continue;
                    }
                    self.order.push_back(ip);
                    self.unanswered_addresses.insert(ip);
                    message.watch_addresses.push(mesh_api::ip_to_bytes(ip));
                }
            }
        }
        while self.addresses.len() > MAX_ADDRESSES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.addresses.remove(&old);
            self.unanswered_addresses.remove(&old);
            view.absent.remove(&old);
            message.unwatch_addresses.push(mesh_api::ip_to_bytes(old));
        }
        let nothing = message.watch.is_empty()
            && message.watch_addresses.is_empty()
            && message.unwatch_addresses.is_empty();
        (!nothing).then_some(message)
    }
}

/// Up to [`BATCH`] lookups: `first`, and what else is queued now.
pub fn batch(first: Lookup, queue: &mut mpsc::Receiver<Lookup>) -> Vec<Lookup> {
    let mut out = vec![first];
    while out.len() < BATCH {
        match queue.try_recv() {
            Ok(l) => out.push(l),
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + last))
    }

    #[test]
    fn asks_once_for_what_is_not_held() {
        let mut asked = Asked::default();
        let mut view = MeshView {
            on_demand: true,
            ..MeshView::default()
        };
        view.absent.insert(ip(9));
        let m = asked
            .ask(
                [
                    Lookup::Address(ip(1)),
                    Lookup::Address(ip(1)),
                    Lookup::Address(ip(9)),
                    Lookup::Workload(WorkloadId::new("default", "b")),
                ],
                &mut view,
            )
            .unwrap();
        assert_eq!(m.watch, ["workload/default/b"]);
        assert_eq!(m.watch_addresses, [vec![10, 0, 0, 1]]);
        assert!(asked.ask([Lookup::Address(ip(1))], &mut view).is_none());
        let all = asked.all(&view, "n1");
        assert_eq!(all.watch, ["workload/default/b"]);
        assert_eq!(all.watch_addresses.len(), 1);
        // Until answered, both are asked again after a resume; a removal answers the key,
        // an absent address the address.
        let again = asked.unanswered().unwrap();
        assert_eq!(again.watch, ["workload/default/b"]);
        asked.answered_by(&ConfigUpdate {
            removals: vec!["workload/default/b".into()],
            absent: vec![vec![10, 0, 0, 1]],
            ..ConfigUpdate::default()
        });
        assert!(asked.unanswered().is_none());
    }

    #[test]
    fn keys_past_the_bound_are_not_asked() {
        let mut asked = Asked::default();
        let mut view = MeshView::default();
        let many: Vec<Lookup> = (0..=MAX_KEYS)
            .map(|i| Lookup::Workload(WorkloadId::new("default", &format!("w{i}"))))
            .collect();
        let m = asked.ask(many, &mut view).unwrap();
        assert_eq!(m.watch.len(), MAX_KEYS);
    }

    #[test]
    fn the_oldest_addresses_are_released_past_the_bound() {
        let mut asked = Asked::default();
        let mut view = MeshView::default();
        let first: Vec<Lookup> = (0..MAX_ADDRESSES as u32)
            .map(|i| Lookup::Address(ip(i)))
            .collect();
        asked.ask(first, &mut view).unwrap();
        view.absent.insert(ip(0));
        let m = asked
            .ask([Lookup::Address(ip(MAX_ADDRESSES as u32))], &mut view)
            .unwrap();
        assert_eq!(m.unwatch_addresses, [vec![10, 0, 0, 0]]);
        assert!(!view.absent.contains(&ip(0)), "asked again when needed");
        assert_eq!(asked.addresses.len(), MAX_ADDRESSES);
    }
}
