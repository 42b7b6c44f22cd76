//! Mycel's configuration model, shared by the control plane and the node daemon.

pub mod authz;
mod config;
#[cfg(feature = "crd")]
pub mod crd;
mod documents;
pub use documents::yaml_documents;
pub mod duration;
mod identity;
pub mod membership;
mod object_key;
pub mod policy;
mod resource;
pub mod spec;
pub mod traffic;
mod validate;

pub use config::{
    config_files, in_namespace, load_dir, load_file, parse, read_dir, Config, ConfigError, Objects,
    Parser,
};
pub use identity::{is_sa_name, is_trust_domain, ParseSpiffeIdError, SpiffeId};
pub use object_key::ObjectKey;
pub use resource::{
    application, parse_document, MeshConfig, Resource, Service, ServicePort, Workload, API_VERSION,
    APP_LABELS, DEFAULT_CERT_TTL, DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, MAX_CERT_TTL,
    MIN_CERT_TTL, RESERVED_PORTS,
};
pub use spec::{Action, AppProtocol, LocalHop, Mode, MtlsMode, Transport};
pub use validate::is_dns_label;
