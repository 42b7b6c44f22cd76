//! A config version too large for one message goes as several (`ConfigUpdate.more`): the
//! control plane splits it into parts of bounded size ([`Parts`]) and the node puts them back
//! together before applying any ([`Assembler`]). gRPC refuses messages over 4 MiB by default,
//! and a first sync grows with the mesh (about 250 bytes per workload).

use prost::{bytes::Bytes, Message};

use crate::{
    encoded::{EncodedResource, EncodedUpdate},
    v1::ConfigUpdate,
};

/// The most a part's resources take, encoded: far below gRPC's 4 MiB limit, so a part with
/// one resource over it still fits, and small because each stream's encoder keeps a buffer
/// as large as the largest message it sent: at 1 MiB, a control plane serving 1,000 nodes
/// held 1.4 GB of them; at 128 KiB, one serving 5,000 held 2.2 GB, and 1.2 GB at 32 KiB,
/// with the cold sync as fast.
pub const MAX_PART_BYTES: usize = 32 << 10;

/// The most a version's parts may hold together on a node: far above what a mesh of 100,000
/// workloads sends (about 25 MB), so that a broken or hostile stream cannot make a node
/// allocate without bound.
pub const MAX_VERSION_BYTES: usize = 512 << 20;

/// `update` as parts of at most [`MAX_PART_BYTES`] of resources each (one resource larger
/// than that goes alone), as the control plane sends them. Only the first keeps `snapshot`;
/// all but the last have `more`.
pub fn split(update: ConfigUpdate) -> Vec<EncodedUpdate> {
    let ConfigUpdate {
        version,
        snapshot,
        upserts,
        removals,
        more: _,
        epoch,
        absent,
    } = update;
    let mut parts = Vec::new();
    let mut builder = Parts::new(epoch, version, snapshot);
    for resource in upserts {
        parts.extend(builder.upsert(EncodedResource::new(resource).wire().clone()));
    }
    for key in removals {
        parts.extend(builder.remove(key));
    }
    for address in absent {
        parts.extend(builder.absent(address));
    }
    parts.push(builder.finish());
    parts
}

/// Builds a version's parts one resource at a time, from resources encoded once for every
/// stream: each call returns a part once it is full, so a sender holds one part at a time.
#[derive(Debug)]
pub struct Parts {
    open: EncodedUpdate,
    size: usize,
}

impl Parts {
    pub fn new(epoch: u64, version: u64, snapshot: bool) -> Self {
        Self {
            open: EncodedUpdate {
                version,
                snapshot,
                upserts: Vec::new(),
                removals: Vec::new(),
                more: true,
                epoch,
                absent: Vec::new(),
            },
            size: 0,
        }
    }

    /// What an entry of a repeated field takes on the wire: its tag, its length, itself.
    fn field(len: usize) -> usize {
        1 + prost::length_delimiter_len(len) + len
    }

    /// Makes room for `len` more bytes: the open part, if it is full.
    fn room(&mut self, len: usize) -> Option<EncodedUpdate> {
        let started = !self.open.upserts.is_empty()
            || !self.open.removals.is_empty()
            || !self.open.absent.is_empty();
        let full = started && self.size + len > MAX_PART_BYTES;
        let done = full.then(|| {
            let next = EncodedUpdate {
                snapshot: false,
                upserts: Vec::new(),
                removals: Vec::new(),
                absent: Vec::new(),
                ..self.open
            };
            self.size = 0;
            std::mem::replace(&mut self.open, next)
        });
        self.size += len;
        done
    }

    /// Adds an encoded `Resource` (shared: no bytes are copied).
    pub fn upsert(&mut self, resource: Bytes) -> Option<EncodedUpdate> {
        let done = self.room(Self::field(resource.len()));
        self.open.upserts.push(resource);
        done
    }

    pub fn remove(&mut self, key: String) -> Option<EncodedUpdate> {
        let done = self.room(Self::field(key.len()));
        self.open.removals.push(key);
        done
    }

    /// Names an address no workload has (an answer to a node that asked).
    pub fn absent(&mut self, address: Vec<u8>) -> Option<EncodedUpdate> {
        let done = self.room(Self::field(address.len()));
        self.open.absent.push(address);
        done
    }

    /// The last part.
    pub fn finish(mut self) -> EncodedUpdate {
        self.open.more = false;
        self.open
    }
}

/// Why a stream's parts cannot be put together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    #[error("a part of version {got} came while version {open} was incomplete")]
    Interleaved { open: u64, got: u64 },
    #[error("a snapshot began in the middle of version {0}")]
    SnapshotInside(u64),
    #[error("version {version}'s parts exceed {MAX_VERSION_BYTES} bytes")]
    TooLarge { version: u64 },
}

/// Puts a stream's parts back together; one per stream.
#[derive(Debug, Default)]
pub struct Assembler {
    open: Option<ConfigUpdate>,
    size: usize,
}

impl Assembler {
    /// Takes the next message of the stream: the whole version once its last part has come.
    pub fn push(&mut self, part: ConfigUpdate) -> Result<Option<ConfigUpdate>, PartsError> {
        let len = part.encoded_len();
        let mut whole = match self.open.take() {
            None => part,
            Some(mut open) => {
                if part.version != open.version {
                    return Err(PartsError::Interleaved {
                        open: open.version,
                        got: part.version,
                    });
                }
                if part.snapshot {
                    return Err(PartsError::SnapshotInside(open.version));
                }
                open.upserts.extend(part.upserts);
                open.removals.extend(part.removals);
                open.absent.extend(part.absent);
                open.more = part.more;
                open
            }
        };
        self.size += len;
        if self.size > MAX_VERSION_BYTES {
            return Err(PartsError::TooLarge {
                version: whole.version,
            });
        }
        if whole.more {
            self.open = Some(whole);
            return Ok(None);
        }
        self.size = 0;
        whole.more = false;
        Ok(Some(whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{resource::Kind, Resource, Workload};

    /// Parts as the node reads them.
    fn decoded(parts: Vec<EncodedUpdate>) -> Vec<ConfigUpdate> {
        parts
            .iter()
            .map(|p| ConfigUpdate::decode(p.encode_to_vec().as_slice()).unwrap())
            .collect()
    }

    fn workload(i: usize, pad: usize) -> Resource {
        Resource {
            key: format!("workload/ns/w{i}"),
            kind: Some(Kind::Workload(Workload {
                namespace: "ns".into(),
                name: format!("w{i}"),
                node: "x".repeat(pad),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_large_snapshot_goes_in_bounded_parts_and_comes_back_whole() {
        let update = ConfigUpdate {
            version: 7,
            snapshot: true,
            upserts: (0..40_000).map(|i| workload(i, 100)).collect(),
            removals: vec!["service/ns/gone".into()],
            more: false,
            epoch: 11,
            absent: vec![vec![10, 0, 0, 9]],
        };
        assert!(
            update.encoded_len() > 4 << 20,
            "bigger than gRPC's default limit"
        );
        let parts = decoded(split(update.clone()));
        assert!(parts.len() > 4, "{}", parts.len());
        for (i, p) in parts.iter().enumerate() {
            // The version and flags aside.
            assert!(p.encoded_len() <= MAX_PART_BYTES + 32, "part {i}");
            assert_eq!(p.snapshot, i == 0);
            assert_eq!(p.more, i + 1 < parts.len());
            assert_eq!(p.version, 7);
        }
        let mut assembler = Assembler::default();
        let mut whole = None;
        for p in parts {
            assert!(whole.is_none(), "nothing is whole before the last part");
            whole = assembler.push(p).unwrap();
        }
        assert_eq!(whole, Some(update));
    }

    #[test]
    fn small_updates_and_oversized_resources_stay_whole() {
        let small = ConfigUpdate {
            version: 3,
            upserts: vec![workload(1, 10)],
            ..Default::default()
        };
        assert_eq!(decoded(split(small.clone())), vec![small.clone()]);
        assert_eq!(Assembler::default().push(small.clone()), Ok(Some(small)));
        let empty = ConfigUpdate {
            version: 4,
            ..Default::default()
        };
        assert_eq!(decoded(split(empty.clone())), vec![empty]);
        let big = ConfigUpdate {
            version: 5,
            upserts: vec![workload(1, 10), workload(2, 2 << 20), workload(3, 10)],
            ..Default::default()
        };
        let parts = decoded(split(big));
        assert_eq!(
            parts.iter().map(|p| p.upserts.len()).collect::<Vec<_>>(),
            [1, 1, 1]
        );
    }

    #[test]
    fn parts_that_do_not_fit_together_are_refused() {
        let part = |version, snapshot, more| ConfigUpdate {
            version,
            snapshot,
            more,
            upserts: vec![workload(1, 10)],
            ..Default::default()
        };
        let mut a = Assembler::default();
        assert_eq!(a.push(part(1, true, true)), Ok(None));
        assert_eq!(
            a.push(part(2, false, false)),
            Err(PartsError::Interleaved { open: 1, got: 2 })
        );
        let mut a = Assembler::default();
        assert_eq!(a.push(part(1, true, true)), Ok(None));
        assert_eq!(
            a.push(part(1, true, false)),
            Err(PartsError::SnapshotInside(1))
        );
        let mut a = Assembler::default();
        let huge = ConfigUpdate {
            version: 9,
            more: true,
            upserts: (0..600).map(|i| workload(i, 1 << 20)).collect(),
            ..Default::default()
        };
        assert_eq!(a.push(huge), Err(PartsError::TooLarge { version: 9 }));
    }
}
