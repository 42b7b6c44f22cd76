//! The model (`mesh_model`) and its protobuf form, both ways, as `From`/`TryFrom`: the control
//! plane encodes, nodes decode. Decoding refuses what the control plane could not have sent, so
//! a node never acts on a value the model cannot hold.
//!
//! An encoding leaves empty the fields the model value alone cannot fill, which its sender
//! fills from the whole config for the node it sends to: a workload's `identity` (from the
//! trust domain) and `netns` (only for the workloads placed on that node), a service's
//! `endpoints`, a policy's `selected` workloads. Access policies are
//! in `convert/policy.rs`, traffic policies and routes in `convert/traffic.rs`.

mod policy;
mod traffic;

pub use policy::{PolicyError, RuleError};
pub use traffic::TrafficError;

use std::net::IpAddr;

use mesh_model::{
    Action, AppProtocol, LocalHop, MeshConfig, Mode, MtlsMode, Service, ServicePort, Transport,
    Workload,
};

use crate::{ip_to_bytes, v1};

/// An enum field that holds no value of the model: unspecified, or a number this build does
/// not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnumError {
    #[error("policy action {0} is neither Allow nor Deny")]
    Action(i32),
    #[error("unknown mode {0}")]
    Mode(i32),
    #[error("mTLS mode {0} is neither PERMISSIVE nor STRICT")]
    MtlsMode(i32),
    #[error("transport {0} is neither TLS nor QUIC")]
    Transport(i32),
    #[error("local hop {0} is neither SOCKMAP nor TCP")]
    LocalHop(i32),
}

/// A protobuf enum as its message carries it, an `i32`, which may be a number this build does
/// not know: the error for such a number is the same as for a known one the model refuses.
pub trait WireEnum: TryFrom<i32> {
    fn unknown(raw: i32) -> EnumError;
}

/// The model value of an enum field, e.g. `decode_enum::<v1::Transport, _>(m.transport)`.
pub fn decode_enum<W, M>(raw: i32) -> Result<M, EnumError>
where
    W: WireEnum,
    M: TryFrom<W, Error = EnumError>,
{
    W::try_from(raw)
        .map_err(|_| W::unknown(raw))
        .and_then(M::try_from)
}

impl WireEnum for v1::PolicyAction {
    fn unknown(raw: i32) -> EnumError {
        EnumError::Action(raw)
    }
}

impl WireEnum for v1::PolicyMode {
    fn unknown(raw: i32) -> EnumError {
        EnumError::Mode(raw)
    }
}

impl WireEnum for v1::MtlsMode {
    fn unknown(raw: i32) -> EnumError {
        EnumError::MtlsMode(raw)
    }
}

impl WireEnum for v1::Transport {
    fn unknown(raw: i32) -> EnumError {
        EnumError::Transport(raw)
    }
}

impl WireEnum for v1::LocalHop {
    fn unknown(raw: i32) -> EnumError {
        EnumError::LocalHop(raw)
    }
}

impl From<LocalHop> for v1::LocalHop {
    fn from(h: LocalHop) -> Self {
        match h {
            LocalHop::Sockmap => v1::LocalHop::Sockmap,
            LocalHop::Tcp => v1::LocalHop::Tcp,
        }
    }
}

impl TryFrom<v1::LocalHop> for LocalHop {
    type Error = EnumError;

    /// UNSPECIFIED comes from a control plane older than the setting: the default (TCP).
    fn try_from(h: v1::LocalHop) -> Result<Self, EnumError> {
        Ok(match h {
            v1::LocalHop::Unspecified => LocalHop::default(),
            v1::LocalHop::Sockmap => LocalHop::Sockmap,
            v1::LocalHop::Tcp => LocalHop::Tcp,
        })
    }
}

impl From<Action> for v1::PolicyAction {
    fn from(a: Action) -> Self {
        match a {
            Action::Allow => v1::PolicyAction::Allow,
            Action::Deny => v1::PolicyAction::Deny,
        }
    }
}

impl TryFrom<v1::PolicyAction> for Action {
    type Error = EnumError;

    fn try_from(a: v1::PolicyAction) -> Result<Self, EnumError> {
        match a {
            v1::PolicyAction::Allow => Ok(Action::Allow),
            v1::PolicyAction::Deny => Ok(Action::Deny),
            v1::PolicyAction::Unspecified => Err(EnumError::Action(a.into())),
        }
    }
}

impl From<Mode> for v1::PolicyMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Enforce => v1::PolicyMode::Enforce,
            Mode::DryRun => v1::PolicyMode::DryRun,
        }
    }
}

// Every wire mode has a model value (ENFORCE is the protocol's zero); the `TryFrom` is for
// `decode_enum`, which refuses numbers this build does not know.
impl TryFrom<v1::PolicyMode> for Mode {
    type Error = EnumError;

    fn try_from(m: v1::PolicyMode) -> Result<Self, EnumError> {
        Ok(match m {
            v1::PolicyMode::Enforce => Mode::Enforce,
            v1::PolicyMode::DryRun => Mode::DryRun,
        })
    }
}

impl From<MtlsMode> for v1::MtlsMode {
    fn from(m: MtlsMode) -> Self {
        match m {
            MtlsMode::Permissive => v1::MtlsMode::Permissive,
            MtlsMode::Strict => v1::MtlsMode::Strict,
        }
    }
}

impl TryFrom<v1::MtlsMode> for MtlsMode {
    type Error = EnumError;

    fn try_from(m: v1::MtlsMode) -> Result<Self, EnumError> {
        match m {
            v1::MtlsMode::Permissive => Ok(MtlsMode::Permissive),
            v1::MtlsMode::Strict => Ok(MtlsMode::Strict),
            v1::MtlsMode::Unspecified => Err(EnumError::MtlsMode(m.into())),
        }
    }
}

impl From<Transport> for v1::Transport {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Tls => v1::Transport::Tls,
            Transport::Quic => v1::Transport::Quic,
        }
    }
}

impl TryFrom<v1::Transport> for Transport {
    type Error = EnumError;

    /// UNSPECIFIED comes from a control plane older than the QUIC transport: TLS, as it was
    /// then.
    fn try_from(t: v1::Transport) -> Result<Self, EnumError> {
        Ok(match t {
            v1::Transport::Unspecified | v1::Transport::Tls => Transport::Tls,
            v1::Transport::Quic => Transport::Quic,
        })
    }
}

/// What nodes need of the mesh settings; the root namespace stays with the control plane,
/// which resolves policy selectors.
impl From<&MeshConfig> for v1::MeshSettings {
    fn from(m: &MeshConfig) -> Self {
        v1::MeshSettings {
            trust_domain: m.trust_domain.clone(),
            cert_ttl_seconds: m.cert_ttl.as_secs(),
            default_action: v1::PolicyAction::from(m.default_action).into(),
            mtls_mode: v1::MtlsMode::from(m.mtls).into(),
            plaintext_ports: m.plaintext_ports.iter().map(|p| u32::from(*p)).collect(),
            transport: v1::Transport::from(m.transport).into(),
            root_namespace: m.root_namespace.clone(),
            local_hop: v1::LocalHop::from(m.local_hop).into(),
        }
    }
}

/// Leaves `identity` and `netns` empty: they depend on the trust domain and on the node the
/// workload is sent to (see the module's comment).
impl From<&Workload> for v1::Workload {
    fn from(w: &Workload) -> Self {
        v1::Workload {
            namespace: w.key.namespace.clone(),
            name: w.key.name.clone(),
            node: w.node.clone(),
            netns: String::new(),
            addresses: w.addresses.iter().map(|a| ip_to_bytes(*a)).collect(),
            identity: String::new(),
            labels: w.labels.clone().into_iter().collect(),
        }
    }
}

/// Leaves `endpoints` empty: they are resolved against the whole config (see the module's
/// comment).
impl From<&Service> for v1::Service {
    fn from(s: &Service) -> Self {
        v1::Service {
            namespace: s.key.namespace.clone(),
            name: s.key.name.clone(),
            vips: s.vips.iter().map(|a| ip_to_bytes(*a)).collect(),
            ports: s.ports.iter().map(v1::ServicePort::from).collect(),
            endpoints: Vec::new(),
        }
    }
}

impl From<&ServicePort> for v1::ServicePort {
    fn from(p: &ServicePort) -> Self {
        v1::ServicePort {
            port: p.port.into(),
            target_port: p.target_port.into(),
            name: p.name.clone().unwrap_or_default(),
            app_protocol: match p.app_protocol {
                None => v1::AppProtocol::Unspecified,
                Some(AppProtocol::Http) => v1::AppProtocol::Http,
                Some(AppProtocol::H2c) => v1::AppProtocol::H2c,
                Some(AppProtocol::Grpc) => v1::AppProtocol::Grpc,
            }
            .into(),
        }
    }
}

impl v1::ServicePort {
    /// What the port speaks; `None` (relayed as bytes) also for a value this build does not
    /// know, as a node did before the field existed.
    pub fn protocol(&self) -> Option<AppProtocol> {
        match v1::AppProtocol::try_from(self.app_protocol) {
            Ok(v1::AppProtocol::Http) => Some(AppProtocol::Http),
            Ok(v1::AppProtocol::H2c) => Some(AppProtocol::H2c),
            Ok(v1::AppProtocol::Grpc) => Some(AppProtocol::Grpc),
            Ok(v1::AppProtocol::Unspecified) | Err(_) => None,
        }
    }
}

/// One connect to refuse in the kernel: destination address and port (0: every port).
impl From<(IpAddr, u16)> for v1::FastDenyEntry {
    fn from((address, port): (IpAddr, u16)) -> Self {
        v1::FastDenyEntry {
            address: ip_to_bytes(address),
            port: port.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ports_protocol_round_trips_and_an_unknown_one_is_relayed_as_bytes() {
        for app_protocol in [
            None,
            Some(AppProtocol::Http),
            Some(AppProtocol::H2c),
            Some(AppProtocol::Grpc),
        ] {
            let port = ServicePort {
                name: None,
                port: 80,
                target_port: 8080,
                app_protocol,
            };
            assert_eq!(v1::ServicePort::from(&port).protocol(), app_protocol);
        }
        let newer = v1::ServicePort {
            port: 80,
            target_port: 80,
            app_protocol: 42,
            ..Default::default()
        };
        assert_eq!(newer.protocol(), None);
    }

    #[test]
    fn enums_round_trip_and_unknown_numbers_are_refused() {
        for a in [Action::Allow, Action::Deny] {
            let raw = i32::from(v1::PolicyAction::from(a));
            assert_eq!(decode_enum::<v1::PolicyAction, Action>(raw), Ok(a));
        }
        for m in [Mode::Enforce, Mode::DryRun] {
            let raw = i32::from(v1::PolicyMode::from(m));
            assert_eq!(decode_enum::<v1::PolicyMode, Mode>(raw), Ok(m));
        }
        for m in [MtlsMode::Permissive, MtlsMode::Strict] {
            let raw = i32::from(v1::MtlsMode::from(m));
            assert_eq!(decode_enum::<v1::MtlsMode, MtlsMode>(raw), Ok(m));
        }
        for t in [Transport::Tls, Transport::Quic] {
            let raw = i32::from(v1::Transport::from(t));
            assert_eq!(decode_enum::<v1::Transport, Transport>(raw), Ok(t));
        }
        assert_eq!(
            decode_enum::<v1::Transport, Transport>(0),
            Ok(Transport::Tls)
        );
        for h in [LocalHop::Tcp, LocalHop::Sockmap] {
            let raw = i32::from(v1::LocalHop::from(h));
            assert_eq!(decode_enum::<v1::LocalHop, LocalHop>(raw), Ok(h));
        }
        // An older control plane sends none: loopback TCP.
        assert_eq!(decode_enum::<v1::LocalHop, LocalHop>(0), Ok(LocalHop::Tcp));
        let refused = [
            decode_enum::<v1::PolicyAction, Action>(0).map(|_| ()),
            decode_enum::<v1::PolicyAction, Action>(9).map(|_| ()),
            decode_enum::<v1::PolicyMode, Mode>(9).map(|_| ()),
            decode_enum::<v1::MtlsMode, MtlsMode>(0).map(|_| ()),
            decode_enum::<v1::Transport, Transport>(9).map(|_| ()),
        ];
        let messages: Vec<String> = refused
            .into_iter()
            .map(|r| r.unwrap_err().to_string())
            .collect();
        assert_eq!(
            messages,
            [
                "policy action 0 is neither Allow nor Deny",
                "policy action 9 is neither Allow nor Deny",
                "unknown mode 9",
                "mTLS mode 0 is neither PERMISSIVE nor STRICT",
                "transport 9 is neither TLS nor QUIC",
            ]
        );
    }
}
