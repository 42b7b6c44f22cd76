//! Mycel's configuration model, shared by the control plane and the node daemon.

pub mod authz;
mod config;
#[cfg(feature = "crd")]
pub mod crd;
pub mod duration;
mod identity;
pub mod membership;
pub mod policy;
mod resource;
pub mod spec;

pub use config::{config_files, load_dir, load_file, parse, read_dir, Config, ConfigError};
pub use identity::{is_sa_name, is_trust_domain, ParseSpiffeIdError, SpiffeId};
pub use resource::{
    parse_document, MeshConfig, ObjectKey, Resource, Service, ServicePort, Workload, API_VERSION,
    DEFAULT_CERT_TTL, DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, MAX_CERT_TTL, MIN_CERT_TTL,
    RESERVED_PORTS,
};
pub use spec::{Action, Mode, MtlsMode, Transport};

/// A Kubernetes-style DNS label: a-z, 0-9 and '-', not at either end, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
