//! The node's side of the control plane: a gRPC channel (TLS, verified against `--cp-ca`) to
//! each address `--cp` names, the config stream that keeps the [`MeshView`] current, and the
//! credentials every call carries. One address is used at a time; when its replica goes away
//! the node moves to the next at once (resuming from the version it holds) and keeps its last
//! view and certificates meanwhile; only when every address has failed in a row does it back
//! off.

pub mod demand;
mod stream;
pub mod view;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use mesh_api::{v1::node_service_client::NodeServiceClient, Credentials, NodeClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use demand::{Lookup, Lookups};
pub use stream::{run as run_stream, ApplyRequest};
pub use view::MeshView;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--cp {addr}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("{path}: {source}")]
    BadToken {
        path: PathBuf,
        source: mesh_api::BadCredentials,
    },
}

/// The most control-plane addresses `--cp` may name.
pub const MAX_ADDRESSES: usize = 16;

/// How to reach the control plane and who to say we are.
#[derive(Clone)]
pub struct CpClient {
    /// One channel per address, each connected on first use.
    channels: Arc<[(String, Channel)]>,
    /// The address in use, for every clone (the config stream and certificate requests move
    /// together).
    current: Arc<AtomicUsize>,
    node: String,
    token_file: PathBuf,
    /// Told to the control plane, whose dashboard scrapes the node there.
    metrics_port: Option<u16>,
}

impl CpClient {
    /// Prepares a channel for each of `addrs` (comma-separated; each connects on first use
    /// and reconnects by itself) and checks that the token file can be read, so a bad command
    /// line fails at start. Nodes start at different addresses (by their name), so that a
    /// fleet spreads over the replicas.
    pub fn new(
        addrs: &str,
        ca_file: &Path,
        node: &str,
        token_file: &Path,
    ) -> Result<Self, ControlError> {
        let ca_pem = std::fs::read(ca_file).map_err(|source| ControlError::Read {
            path: ca_file.into(),
            source,
        })?;
        let list: Vec<&str> = addrs.split(',').map(str::trim).collect();
        if list.iter().any(|a| a.is_empty()) || list.len() > MAX_ADDRESSES {
            return Err(ControlError::BadAddress {
                addr: addrs.into(),
                reason: format!("name 1 to {MAX_ADDRESSES} addresses, comma-separated, none empty"),
            });
        }
        let mut channels = Vec::with_capacity(list.len());
        for addr in list {
            channels.push((addr.to_owned(), channel(addr, &ca_pem)?));
        }
        let start = node
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let client = Self {
            current: Arc::new(AtomicUsize::new(start % channels.len())),
            channels: channels.into(),
            node: node.into(),
            token_file: token_file.into(),
            metrics_port: None,
        };
        client.credentials()?;
        Ok(client)
    }

    /// The address in use, and its channel.
    fn in_use(&self) -> &(String, Channel) {
        &self.channels[self.current.load(Ordering::Relaxed) % self.channels.len()]
    }

    /// The address in use.
    pub fn address(&self) -> &str {
        &self.in_use().0
    }

    /// How many addresses there are to try.
    pub fn addresses(&self) -> usize {
        self.channels.len()
    }

    /// Moves to the next address (to the same one when there is only one); the one now in
    /// use.
    pub fn fail_over(&self) -> &str {
        self.current.fetch_add(1, Ordering::Relaxed);
        self.address()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The port of this node's metrics endpoint, to tell the control plane.
    pub fn with_metrics_port(mut self, port: u16) -> Self {
        self.metrics_port = Some(port);
        self
    }

    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    /// The token file is read for every connection, so it can be replaced without a restart.
    fn credentials(&self) -> Result<Credentials, ControlError> {
        let text =
            std::fs::read_to_string(&self.token_file).map_err(|source| ControlError::Read {
                path: self.token_file.clone(),
                source,
            })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(ControlError::EmptyToken {
                path: self.token_file.clone(),
            });
        }
        Credentials::new(&self.node, token).map_err(|source| ControlError::BadToken {
            path: self.token_file.clone(),
            source,
        })
    }

    pub fn api(&self) -> Result<NodeClient, ControlError> {
        Ok(NodeServiceClient::with_interceptor(
            self.in_use().1.clone(),
            self.credentials()?,
        ))
    }
}

/// A lazily connected channel to `addr` (`host:port` or `https://host:port`), verified
/// against `ca_pem`.
fn channel(addr: &str, ca_pem: &[u8]) -> Result<Channel, ControlError> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("https://{addr}")
    };
    let bad = |reason: String| ControlError::BadAddress {
        addr: addr.into(),
        reason,
    };
    if !uri.starts_with("https://") {
        return Err(bad("only https:// is supported".into()));
    }
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| bad(e.to_string()))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Exponential backoff with jitter, reset after a success.
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay to wait now; the next one doubles, up to the maximum.
    pub fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to 25% jitter, so nodes cut off together do not reconnect together.
        base + base.mul_f64(jitter() / 4.0)
    }
}

/// A fraction in [0, 1), different from node to node and from time to time.
pub(crate) fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}
