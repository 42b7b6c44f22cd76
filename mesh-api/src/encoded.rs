//! What the control plane sends on a config stream: `ConfigUpdate` on the wire, with each
//! resource already encoded.
//!
//! An embedded message and a `bytes` field are both a tag, a length and the bytes, so a
//! resource encoded once can be written into every node's update as it is. At 5,000 nodes a
//! resource that every node holds was otherwise copied and encoded 5,000 times.

use prost::{bytes::Bytes, Message};

use crate::v1::Resource;

/// `ConfigUpdate`, field for field and tag for tag, with `upserts` holding each resource's
/// encoding.
#[derive(Clone, PartialEq, Message)]
pub struct EncodedUpdate {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(bool, tag = "2")]
    pub snapshot: bool,
    /// Each an encoded `Resource`.
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub upserts: Vec<Bytes>,
    #[prost(string, repeated, tag = "4")]
    pub removals: Vec<String>,
    #[prost(bool, tag = "5")]
    pub more: bool,
    #[prost(uint64, tag = "6")]
    pub epoch: u64,
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub absent: Vec<Vec<u8>>,
}

/// A resource and its encoding, made together so that they cannot disagree. Two are equal when
/// their resources are: a map's entries may be encoded in any order.
#[derive(Debug, Clone)]
pub struct EncodedResource {
    resource: Resource,
    wire: Bytes,
}

impl PartialEq for EncodedResource {
    fn eq(&self, other: &Self) -> bool {
        self.resource == other.resource
    }
}

impl EncodedResource {
    pub fn new(resource: Resource) -> Self {
        let wire = Bytes::from(resource.encode_to_vec());
        Self { resource, wire }
    }

    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    pub fn key(&self) -> &str {
        &self.resource.key
    }

    /// The encoding, shared (cloning it copies no bytes).
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{resource::Kind, ConfigUpdate, Workload};

    #[test]
    fn an_encoded_update_reads_as_a_config_update() {
        let resources: Vec<Resource> = (0..3)
            .map(|i| Resource {
                key: format!("workload/ns/w{i}"),
                kind: Some(Kind::Workload(Workload {
                    namespace: "ns".into(),
                    name: format!("w{i}"),
                    labels: [("app".to_string(), format!("a{i}"))].into(),
                    addresses: vec![vec![10, 0, 0, i]],
                    ..Default::default()
                })),
            })
            .collect();
        let encoded = EncodedUpdate {
            version: 9,
            snapshot: true,
            upserts: resources
                .iter()
                .map(|r| EncodedResource::new(r.clone()).wire().clone())
                .collect(),
            removals: vec!["service/ns/gone".into()],
            more: true,
            epoch: 4,
            absent: vec![vec![10, 9, 9, 9]],
        };
        let decoded = ConfigUpdate::decode(encoded.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            decoded,
            ConfigUpdate {
                version: 9,
                snapshot: true,
                upserts: resources,
                removals: vec!["service/ns/gone".into()],
                more: true,
                epoch: 4,
                absent: vec![vec![10, 9, 9, 9]],
            }
        );
    }
}
