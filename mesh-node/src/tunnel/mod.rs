//! The node-to-node tunnel: TLS 1.3 on port 15008 between the source and destination pods'
//! netns, each side presenting its workload's SVID, then one header each way (`header.rs`) and
//! the application's bytes.
//!
//! - `tls.rs`: rustls configurations and the SPIFFE identity checks;
//! - `session.rs`: one connection: rustls's handshake, then this node's record layer
//!   (`record.rs`); `copy.rs` moves the application's bytes through it without copies, and
//!   `stream_io.rs` makes it a byte stream for code that speaks a protocol over it;
//! - `pool.rs`: idle sessions, reused by the next connection between the same two pods;
//! - `anchors.rs`: the trust roots in force, and the end of tunnels whose root was withdrawn.
//!
//! TLS session resumption is not used: a pooled session saves more (no handshake at all) and
//! its lifetime is bounded by the pool.

pub mod anchors;
mod copy;
pub mod header;
pub mod pool;
pub mod quic;
pub mod record;
pub mod session;
pub mod stream_io;
pub mod tls;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use mesh_model::SpiffeId;
use rustls::{ClientConfig, ServerConfig};

use crate::identity::SvidStore;
pub use session::Session;
pub use tls::Trust;

/// The port every enrolled pod's tunnel listener binds.
pub const TUNNEL_PORT: u16 = mesh_ebpf_common::TUNNEL_PORT;

/// rustls configurations for one trust bundle, built on first use and shared by every tunnel
/// with the same identities. Replaced as a whole when the trust bundle or domain changes.
pub struct TlsConfigs {
    trust: Trust,
    svids: Arc<SvidStore>,
    clients: Mutex<HashMap<(String, SpiffeId), Arc<ClientConfig>>>,
    servers: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl TlsConfigs {
    pub fn new(trust: Trust, svids: Arc<SvidStore>) -> Self {
        Self {
            trust,
            svids,
            clients: Mutex::default(),
            servers: Mutex::default(),
        }
    }

    /// Tells trust bundles apart; see [`Trust::fingerprint`].
    pub fn trust_fingerprint(&self) -> u64 {
        self.trust.fingerprint()
    }

    /// The trust root `chain` (verified under this bundle, leaf first) ends at.
    pub fn anchor_of(&self, chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<u64> {
        self.trust.anchor_of(chain)
    }

    /// Whether this node holds a certificate for `identity` right now.
    pub fn has_svid(&self, identity: &str) -> bool {
        self.svids.get(identity).is_some()
    }

    /// The serial of this node's current certificate for `identity`, if it holds one.
    pub fn svid_serial(&self, identity: &str) -> Option<String> {
        self.svids.get(identity).map(|s| s.serial.clone())
    }

    /// For dialling a workload that must prove it is `expected`, as `source`.
    pub fn client(
        &self,
        source: &str,
        expected: SpiffeId,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let key = (source.to_owned(), expected);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let config = Arc::new(tls::client_config(
            self.current(source),
            &self.trust,
            key.1.clone(),
        )?);
        clients.insert(key, config.clone());
        Ok(config)
    }

    /// For accepting tunnels to a pod whose identity is `local`.
    pub fn server(&self, local: &str) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = servers.get(local) {
            return Ok(s.clone());
        }
        let config = Arc::new(tls::server_config(self.current(local), &self.trust)?);
        servers.insert(local.to_owned(), config.clone());
        Ok(config)
    }

    fn current(&self, identity: &str) -> tls::CurrentSvid {
        let svids = self.svids.clone();
        let identity = identity.to_owned();
        tls::CurrentSvid::new(move || svids.get(&identity).map(|s| s.certified.clone()))
    }
}
