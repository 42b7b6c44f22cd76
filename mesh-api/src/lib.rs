//! Generated protobuf types and gRPC stubs, their conversions from and to the model
//! (`convert`), plus the few helpers every user of them needs.

pub mod v1 {
    tonic::include_proto!("mycel.v1");
}

/// The node service as the control plane serves it (`build.rs`).
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/mycel.v1.NodeService.rs"));
}

/// Workload keys and addresses one on-demand config stream may watch, together
/// (`ConfigAck.watch`). A node needs the workloads its pods talk to; 65,536 is far above that
/// and bounds what an authenticated node can make the control plane hold (a few MB per
/// stream). A node that needs room releases what it no longer uses (`unwatch`).
pub const MAX_WATCHES: usize = 1 << 16;

pub mod convert;
pub mod encoded;
pub mod parts;

use std::net::IpAddr;

/// Encodes an address as the 4 or 16 raw bytes the protocol carries.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A message of an on-demand node that watches `keys` and `addresses`, and answers no
/// version.
pub fn watch(
    keys: impl IntoIterator<Item = String>,
    addresses: impl IntoIterator<Item = IpAddr>,
) -> v1::ConfigAck {
    v1::ConfigAck {
        watch: keys.into_iter().collect(),
        watch_addresses: addresses.into_iter().map(ip_to_bytes).collect(),
        ..v1::ConfigAck::default()
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

/// How the control plane ends a config stream when it stops in order (a restart, an
/// upgrade): `UNAVAILABLE` with this message, so that the node can tell it from a failure.
pub mod shutdown {
    pub const MESSAGE: &str = "the control plane is shutting down";

    pub fn status() -> tonic::Status {
        tonic::Status::unavailable(MESSAGE)
    }

    pub fn is(status: &tonic::Status) -> bool {
        status.code() == tonic::Code::Unavailable && status.message() == MESSAGE
    }
}

/// gRPC metadata keys.
pub mod metadata {
    pub const AUTHORIZATION: &str = "authorization";
    pub const NODE: &str = "x-mycel-node";
    /// On a config stream: the epoch and version the node holds, "<epoch>-<version>".
    pub const RESUME: &str = "x-mycel-resume";

    /// On a config stream: "workloads" asks for other nodes' workloads on demand only.
    pub const ON_DEMAND: &str = "x-mycel-on-demand";
    pub const ON_DEMAND_WORKLOADS: &str = "workloads";

    /// Asks in `request` for other nodes' workloads on demand (see `node.proto`).
    pub fn set_on_demand<T>(request: &mut tonic::Request<T>) {
        request.metadata_mut().insert(
            ON_DEMAND,
            tonic::metadata::MetadataValue::from_static(ON_DEMAND_WORKLOADS),
        );
    }

    /// Whether `request` asks for workloads on demand. Any other value is an error: a node
    /// that asks for something this control plane does not know must not be sent the whole
    /// mesh as if it had not asked.
    pub fn on_demand<T>(request: &tonic::Request<T>) -> Result<bool, String> {
        match request.metadata().get(ON_DEMAND).map(|v| v.to_str()) {
            None => Ok(false),
            Some(Ok(ON_DEMAND_WORKLOADS)) => Ok(true),
            Some(Ok(other)) => Err(format!(
                "`{ON_DEMAND}: {other}` is not known: the value is `{ON_DEMAND_WORKLOADS}`"
            )),
            Some(Err(_)) => Err(format!("`{ON_DEMAND}` is not ASCII")),
        }
    }

    /// Names in `request` the version a node holds of the control-plane run `epoch`.
    pub fn set_resume<T>(request: &mut tonic::Request<T>, epoch: u64, version: u64) {
        // Digits and a dash: always a valid header value.
        if let Ok(value) = format!("{epoch}-{version}").parse() {
            request.metadata_mut().insert(RESUME, value);
        }
    }

    /// On a config stream: the port of the node's metrics endpoint (its --metrics-listen), which
    /// the control plane's dashboard scrapes at the address the stream comes from (never an
    /// address the node names).
    pub const METRICS_PORT: &str = "x-mycel-metrics-port";

    pub fn set_metrics_port<T>(request: &mut tonic::Request<T>, port: u16) {
        // Digits: always a valid header value.
        if let Ok(value) = port.to_string().parse() {
            request.metadata_mut().insert(METRICS_PORT, value);
        }
    }

    /// The metrics port a request names, if it names a port.
    pub fn metrics_port<T>(request: &tonic::Request<T>) -> Option<u16> {
        let value = request.metadata().get(METRICS_PORT)?.to_str().ok()?;
        value.parse().ok().filter(|p| *p != 0)
    }

    /// The epoch and version a request names, if it names them well-formed.
    pub fn resume<T>(request: &tonic::Request<T>) -> Option<(u64, u64)> {
        let value = request.metadata().get(RESUME)?.to_str().ok()?;
        let (epoch, version) = value.split_once('-')?;
        Some((epoch.parse().ok()?, version.parse().ok()?))
    }
}

/// Adds a node's name and join token to every call it makes.
#[derive(Clone)]
pub struct Credentials {
    node: tonic::metadata::AsciiMetadataValue,
    bearer: tonic::metadata::AsciiMetadataValue,
}

#[derive(Debug, thiserror::Error)]
#[error("the node name or token contains characters that cannot go in gRPC metadata")]
pub struct BadCredentials;

impl Credentials {
    pub fn new(node: &str, token: &str) -> Result<Self, BadCredentials> {
        Ok(Self {
            node: node.parse().map_err(|_| BadCredentials)?,
            bearer: format!("Bearer {token}")
                .parse()
                .map_err(|_| BadCredentials)?,
        })
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(metadata::NODE, self.node.clone());
        req.metadata_mut()
            .insert(metadata::AUTHORIZATION, self.bearer.clone());
        Ok(req)
    }
}

/// The node API client as nodes use it: every call carries [`Credentials`].
pub type NodeClient = v1::node_service_client::NodeServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>,
>;

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

    pub fn policy(namespace: &str, name: &str) -> String {
        format!("policy/{namespace}/{name}")
    }

    pub fn fast_deny(namespace: &str, name: &str) -> String {
        format!("fast-deny/{namespace}/{name}")
    }

    pub fn traffic_policy(namespace: &str, name: &str) -> String {
        format!("traffic-policy/{namespace}/{name}")
    }

    pub fn route(namespace: &str, name: &str) -> String {
        format!("route/{namespace}/{name}")
    }

    /// The namespaced kinds of the config stream's keys.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Workload,
        Service,
        Policy,
        FastDeny,
        TrafficPolicy,
        Route,
    }

    /// The kind and object of a namespaced key (`workload/ns/name`, …); `None` for the
    /// singletons and for anything malformed.
    pub fn parse(key: &str) -> Option<(Kind, mesh_model::ObjectKey)> {
        let (kind, rest) = key.split_once('/')?;
        let kind = match kind {
            "workload" => Kind::Workload,
            "service" => Kind::Service,
            "policy" => Kind::Policy,
            "fast-deny" => Kind::FastDeny,
            "traffic-policy" => Kind::TrafficPolicy,
            "route" => Kind::Route,
            _ => return None,
        };
        Some((kind, object_key(rest)?))
    }

    /// `namespace/name`, as services name their endpoints on the wire.
    pub fn object_key(text: &str) -> Option<mesh_model::ObjectKey> {
        let (namespace, name) = text.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
            .then(|| mesh_model::ObjectKey::new(namespace, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_point_round_trips_and_a_bad_one_is_none() {
        let mut request = tonic::Request::new(());
        metadata::set_resume(&mut request, u64::MAX, 42);
        assert_eq!(metadata::resume(&request), Some((u64::MAX, 42)));
        for bad in [
            "",
            "7",
            "7-",
            "-7",
            "x-7",
            "7-x",
            "7-8-9",
            "18446744073709551616-1",
        ] {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert(metadata::RESUME, bad.parse().unwrap());
            assert_eq!(metadata::resume(&request), None, "{bad:?}");
        }
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["10.1.2.3", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_bytes(&ip_to_bytes(ip)), Some(ip));
        }
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn keys_round_trip_and_malformed_ones_are_none() {
        let (kind, key) = keys::parse(&keys::fast_deny("shop", "web")).unwrap();
        assert_eq!(kind, keys::Kind::FastDeny);
        assert_eq!(key, mesh_model::ObjectKey::new("shop", "web"));
        for bad in [
            "mesh",
            "trust-bundle",
            "workload/",
            "workload/a",
            "workload//b",
            "workload/a/b/c",
            "node/a/b",
        ] {
            assert_eq!(keys::parse(bad), None, "{bad}");
        }
    }
}
