//! A kernel hash map used as a set (the value is unused), with this process as its only
//! writer: what it holds is mirrored here, so making it equal to a desired set touches only
//! the difference. The map may come pinned from an earlier daemon; its entries are read once
//! when it is adopted.

use std::{collections::HashSet, hash::Hash};

use aya::{
    maps::{HashMap, MapData, MapError},
    Pod,
};

pub struct MapSet<K> {
    map: HashMap<MapData, K, u32>,
    held: HashSet<K>,
}

/// What one [`MapSet::sync`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetUpdate {
    pub added: usize,
    pub removed: usize,
    /// Inserts or removals the kernel refused (a full map, most likely).
    pub failed: usize,
    /// Entries held afterwards.
    pub held: usize,
}

impl<K: Pod + Hash + Eq> MapSet<K> {
    /// Takes over `map` with whatever it holds.
    pub fn adopt(map: HashMap<MapData, K, u32>) -> Self {
        let held = map.keys().filter_map(Result::ok).collect();
        Self { map, held }
    }

    /// Makes the map hold exactly `desired`: new entries first, then stale ones removed. An
    /// entry the kernel refuses is left out and counted.
    pub fn sync(&mut self, desired: &HashSet<K>) -> SetUpdate {
        let mut update = SetUpdate::default();
        for key in desired.difference(&self.held).copied().collect::<Vec<_>>() {
            match self.map.insert(key, 1, 0) {
                Ok(()) => {
                    self.held.insert(key);
                    update.added += 1;
                }
                Err(_) => update.failed += 1,
            }
        }
        for key in self.held.difference(desired).copied().collect::<Vec<_>>() {
            match self.map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.held.remove(&key);
                    update.removed += 1;
                }
                Err(_) => update.failed += 1,
            }
        }
        update.held = self.held.len();
        update
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }
}
