//! Generated protobuf types and gRPC stubs, plus the few helpers every user of them needs.

pub mod v1 {
    tonic::include_proto!("mycel.v1");
}

use std::net::IpAddr;

/// Encodes an address as the 4 or 16 raw bytes the protocol carries.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Decodes 4 or 16 raw bytes; anything else is `None`.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// gRPC metadata keys.
pub mod metadata {
    pub const AUTHORIZATION: &str = "authorization";
    pub const NODE: &str = "x-mycel-node";
}

/// Resource keys of the config stream.
pub mod keys {
    pub const MESH: &str = "mesh";
    pub const TRUST_BUNDLE: &str = "trust-bundle";

    pub fn workload(namespace: &str, name: &str) -> String {
        format!("workload/{namespace}/{name}")
    }

    pub fn service(namespace: &str, name: &str) -> String {
        format!("service/{namespace}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for ip in ["10.1.2.3", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_bytes(&ip_to_bytes(ip)), Some(ip));
        }
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    }
}
