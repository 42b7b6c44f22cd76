//! What the fuzz targets share: a small PKI made once per process (keys are slow to make),
//! a runtime to drive async code, and a reader of fuzz input.

use std::sync::{Arc, OnceLock};

use mesh_node::tunnel::tls::{client_config, server_config, CurrentSvid, Trust};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
    ClientConfig, ServerConfig,
};

pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/order";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/payment";

/// The mesh's rustls configurations for one client and one server identity, and the root.
pub struct Pki {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    pub root: Vec<u8>,
    pub trust: Trust,
    pub leaf: CertificateDer<'static>,
}

/// Made on first use, then shared by every run of the process.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let key = KeyPair::generate().expect("a CA key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = p.self_signed(&key).expect("a root").der().to_vec();
        let issuer = Issuer::new(p, key);
        let svid = |uri: &str| {
            let key = KeyPair::generate().expect("a key");
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("a URI"))];
            p.is_ca = IsCa::ExplicitNoCa;
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(30);
            let cert = p.signed_by(&key, &issuer).expect("an SVID");
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let provider = rustls::crypto::ring::default_provider();
            let ck = Arc::new(
                CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).expect("a key"),
            );
            (
                CurrentSvid::new({
                    let ck = ck.clone();
                    move || Some(ck.clone())
                }),
                ck.cert[0].clone(),
            )
        };
        let trust = Trust::new(std::slice::from_ref(&root), "cluster.local").expect("a trust");
        let (client_svid, leaf) = svid(CLIENT_ID);
        let (server_svid, _) = svid(SERVER_ID);
        let client = client_config(client_svid, &trust, SERVER_ID.parse().expect("an id"))
            .expect("a client config");
        let server = server_config(server_svid, &trust).expect("a server config");
        Pki {
            client: Arc::new(client),
            server: Arc::new(server),
            root,
            trust,
            leaf,
        }
    })
}

/// A single-threaded runtime whose clock is paused: it moves only when every task waits, so
/// a timeout fires at once when both ends of an exchange wait for each other, and never
/// while a task is busy. A task that spins thus hangs the run, which libFuzzer reports
/// (`-timeout`), instead of being mistaken for one that waits.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

/// Reads small numbers off the front of fuzz input; zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let (take, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        take
    }
}
