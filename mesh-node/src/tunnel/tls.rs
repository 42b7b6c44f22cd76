//! mTLS with SPIFFE identities, for both ends of a tunnel.
//!
//! Standard WebPKI name checks do not apply: an SVID names its workload with one URI SAN
//! (`spiffe://<td>/ns/<ns>/sa/<sa>`) and no DNS name. So the client verifies the server's chain
//! against the trust bundle and then requires exactly the SPIFFE ID it expects at that
//! address; the server verifies the client's chain, requires a client certificate, and
//! requires the mesh's trust domain. The verified client ID is read back with [`peer_identity`]
//! for logs and policy.

use std::sync::Arc;

use mesh_model::SpiffeId;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// Why a peer certificate was not accepted; becomes the handshake error and the log line.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate has no SPIFFE ID URI SAN")]
    NoSpiffeId,
    #[error("the certificate carries {0} URI SANs; an SVID has exactly one")]
    SeveralUris(usize),
    #[error("{0}")]
    BadSpiffeId(#[from] mesh_model::ParseSpiffeIdError),
    #[error("peer is {found}, expected {expected}")]
    WrongIdentity { expected: String, found: String },
    #[error("peer is in trust domain {found}, expected {expected}")]
    WrongTrustDomain { expected: String, found: String },
    #[error("unreadable certificate: {0}")]
    Unreadable(String),
}

impl From<IdentityError> for Error {
    fn from(e: IdentityError) -> Self {
        Error::General(e.to_string())
    }
}

/// The SPIFFE ID of a leaf certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::Unreadable(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unreadable(e.to_string()))?
        .ok_or(IdentityError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => Ok(uri.parse()?),
        many => Err(IdentityError::SeveralUris(many.len())),
    }
}

/// A certificate's serial number as `/debug/certs` shows it (hex bytes joined by colons).
pub fn serial(cert: &CertificateDer<'_>) -> Option<String> {
    x509_parser::parse_x509_certificate(cert)
        .ok()
        .map(|(_, c)| c.raw_serial_as_string())
}

/// When a certificate stops being valid.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Names a trust root: the first 8 bytes of its DER's SHA-256.
pub fn anchor_id(root_der: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, root_der);
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(id)
}

/// The verified peer's identity of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, IdentityError> {
    certs
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoSpiffeId)
        .and_then(spiffe_id)
}

/// The roots workload certificates chain to, and the mesh's trust domain.
#[derive(Debug, Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    fingerprint: u64,
    /// Each root's [`anchor_id`], with the root alone (as a store and as a client verifier),
    /// to tell which one a peer's chain ends at.
    anchors: Vec<Anchor>,
}

#[derive(Debug, Clone)]
struct Anchor {
    id: u64,
    alone: Arc<RootCertStore>,
    clients: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    pub fn new(roots_der: &[Vec<u8>], trust_domain: &str) -> Result<Self, Error> {
        use std::hash::{Hash as _, Hasher as _};
        let mut roots = RootCertStore::empty();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut anchors = Vec::new();
        for der in roots_der {
            roots.add(CertificateDer::from(der.clone()))?;
            der.hash(&mut hasher);
            let mut one = RootCertStore::empty();
            one.add(CertificateDer::from(der.clone()))?;
            let alone = Arc::new(one);
            let clients = WebPkiClientVerifier::builder_with_provider(alone.clone(), provider())
                .build()
                .map_err(|e| Error::General(e.to_string()))?;
            anchors.push(Anchor {
                id: anchor_id(der),
                alone,
                clients,
            });
        }
        trust_domain.hash(&mut hasher);
        Ok(Self {
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_owned(),
            fingerprint: hasher.finish(),
            anchors,
        })
    }

    /// Tells bundles apart (sessions made under one are not reused under another).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The [`anchor_id`] of the root of this bundle that `chain` (leaf first) verifies
    /// under, each root tried alone; `None` when none does. Always verified, also with one
    /// root: the chain may have been checked under an earlier bundle (a QUIC endpoint's
    /// server configuration follows the directory a moment late). A client's chain or a
    /// server's: the handshake checked its use; this only names its root, so a certificate
    /// issued for one use alone is placed as well as one issued for both.
    pub fn anchor_of(&self, chain: &[CertificateDer<'_>]) -> Option<u64> {
        let (leaf, intermediates) = chain.split_first()?;
        let now = UnixTime::now();
        let parsed = ParsedCertificate::try_from(leaf).ok()?;
        let algorithms = provider().signature_verification_algorithms.all;
        self.anchors.iter().find_map(|anchor| {
            let as_client = anchor.clients.verify_client_cert(leaf, intermediates, now);
            let signed = as_client.is_ok()
                || rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &anchor.alone,
                    intermediates,
                    now,
                    algorithms,
                )
                .is_ok();
            signed.then_some(anchor.id)
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate to present, looked up at each handshake so that a renewal is picked up
/// by the next connection without touching open ones.
#[derive(Clone)]
pub struct CurrentSvid(Arc<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>);

impl CurrentSvid {
    pub fn new(f: impl Fn() -> Option<Arc<CertifiedKey>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for CurrentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentSvid")
    }
}

impl rustls::server::ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }
}

impl rustls::client::ResolvesClientCert for CurrentSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side of a tunnel to a workload that must be `expected`, presenting `svid`.
pub fn client_config(
    svid: CurrentSvid,
    trust: &Trust,
    expected: SpiffeId,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(ExpectedServer {
        roots: trust.roots.clone(),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(svid));
    // Sessions are pooled instead of resumed, and `session.rs` takes the record layer over
    // from rustls after the handshake.
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_secret_extraction = true;
    Ok(config)
}

/// Server side of a tunnel, presenting `svid` and requiring a client SVID of the mesh.
pub fn server_config(svid: CurrentSvid, trust: &Trust) -> Result<ServerConfig, Error> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
    let verifier = Arc::new(MeshClient {
        inner,
        trust_domain: trust.trust_domain.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(svid));
    // No tickets: nothing follows the handshake that `session.rs` would have to pass back to
    // rustls, and sessions are pooled instead of resumed.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(config)
}

/// Chain to the trust bundle, then exactly the expected SPIFFE ID (no DNS name check).
#[derive(Debug)]
struct ExpectedServer {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = spiffe_id(end_entity)?;
        if found != self.expected {
            return Err(IdentityError::WrongIdentity {
                expected: self.expected.to_string(),
                found: found.to_string(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// WebPKI client verification (chain, validity, clientAuth usage), then the trust domain.
#[derive(Debug)]
struct MeshClient {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for MeshClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id(end_entity)?;
        if id.trust_domain != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain,
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    pub(crate) struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pub(crate) root: Vec<u8>,
    }

    pub(crate) fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = p.self_signed(&key).unwrap().der().to_vec();
        Ca {
            issuer: Issuer::new(p, key),
            root,
        }
    }

    /// An SVID for `uri` signed by `ca`, valid from `from` to `to` seconds relative to now.
    pub(crate) fn svid(ca: &Ca, uri: &str, from: i64, to: i64) -> CurrentSvid {
        let both = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        svid_for(ca, uri, (from, to), &both)
    }

    /// An SVID for `uri` signed by `ca`, valid over `(from, to)` relative to now, for `uses`.
    fn svid_for(
        ca: &Ca,
        uri: &str,
        (from, to): (i64, i64),
        uses: &[ExtendedKeyUsagePurpose],
    ) -> CurrentSvid {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = uses.to_vec();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::seconds(from);
        p.not_after = now + time::Duration::seconds(to);
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let ck = Arc::new(
            CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider()).unwrap(),
        );
        CurrentSvid::new(move || Some(ck.clone()))
    }

    pub(crate) const A: &str = "spiffe://td/ns/shop/sa/a";
    pub(crate) const B: &str = "spiffe://td/ns/shop/sa/b";

    /// Runs a handshake over an in-memory pipe. Ok: the identity the server verified.
    async fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<SpiffeId, (String, String)> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let (cres, sres) = tokio::join!(
            async {
                let mut tls = connector.connect(name, c).await?;
                tls.write_all(b"ping").await?;
                tls.flush().await?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(())
            },
            async {
                let mut tls = acceptor.accept(s).await?;
                let id = peer_identity(tls.get_ref().1.peer_certificates());
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await?;
                tls.write_all(b"pong").await?;
                tls.flush().await?;
                Ok::<_, std::io::Error>(id)
            }
        );
        match (cres, sres) {
            (Ok(()), Ok(Ok(id))) => Ok(id),
            (c, s) => Err((
                c.err().map(|e| e.to_string()).unwrap_or_default(),
                match s {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => String::new(),
                },
            )),
        }
    }

    pub(crate) fn trust(ca: &Ca) -> Trust {
        Trust::new(std::slice::from_ref(&ca.root), "td").unwrap()
    }

    /// The certificate an SVID presents.
    pub(crate) fn leaf(svid: &CurrentSvid) -> CertificateDer<'static> {
        (svid.0)().unwrap().cert[0].clone()
    }

    #[test]
    fn the_anchor_of_a_chain_is_the_root_that_signed_it() {
        let (old, new, foreign) = (ca(), ca(), ca());
        let both = Trust::new(&[old.root.clone(), new.root.clone()], "td").unwrap();
        for ca in [&old, &new] {
            let chain = [leaf(&svid(ca, A, -60, 3600))];
            assert_eq!(both.anchor_of(&chain), Some(anchor_id(&ca.root)));
            assert_eq!(trust(ca).anchor_of(&chain), Some(anchor_id(&ca.root)));
        }
        let stranger = [leaf(&svid(&foreign, A, -60, 3600))];
        assert_eq!(both.anchor_of(&stranger), None);
        // A server's chain is placed as well as a client's, whatever use it was issued for.
        for uses in [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ] {
            let chain = [leaf(&svid_for(
                &new,
                B,
                (-60, 3600),
                std::slice::from_ref(&uses),
            ))];
            assert_eq!(
                both.anchor_of(&chain),
                Some(anchor_id(&new.root)),
                "{uses:?}"
            );
        }
        // One root is checked too: a chain verified under an earlier bundle finds none.
        assert_eq!(
            trust(&new).anchor_of(&[leaf(&svid(&old, A, -60, 3600))]),
            None
        );
        assert_ne!(anchor_id(&old.root), anchor_id(&new.root));
    }

    #[tokio::test]
    async fn both_sides_verify_each_other() {
        let ca = ca();
        let t = trust(&ca);
        let client = client_config(svid(&ca, A, -60, 3600), &t, B.parse().unwrap()).unwrap();
        let server = server_config(svid(&ca, B, -60, 3600), &t).unwrap();
        assert_eq!(handshake(client, server).await.unwrap().to_string(), A);
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_another_identity() {
        let ca = ca();
        let t = trust(&ca);
        let client = client_config(svid(&ca, A, -60, 3600), &t, B.parse().unwrap()).unwrap();
        let server = server_config(svid(&ca, "spiffe://td/ns/shop/sa/c", -60, 3600), &t).unwrap();
        let (c, _) = handshake(client, server).await.unwrap_err();
        assert!(c.contains("expected spiffe://td/ns/shop/sa/b"), "{c}");
    }

    #[tokio::test]
    async fn server_refuses_bad_client_certificates() {
        let (mesh_ca, other_ca) = (ca(), ca());
        let ca = mesh_ca;
        let t = trust(&ca);
        let server = || server_config(svid(&ca, B, -60, 3600), &t).unwrap();
        let client = |s: CurrentSvid| client_config(s, &t, B.parse().unwrap()).unwrap();

        let (_, s) = handshake(
            client(svid(&ca, "spiffe://other/ns/shop/sa/a", -60, 3600)),
            server(),
        )
        .await
        .unwrap_err();
        assert!(s.contains("trust domain other"), "{s}");

        let (_, s) = handshake(client(svid(&ca, A, -7200, -3600)), server())
            .await
            .unwrap_err();
        assert!(s.to_lowercase().contains("expired"), "{s}");

        // Same subject name as the mesh's root, different key: the signature cannot verify.
        let (_, s) = handshake(client(svid(&other_ca, A, -60, 3600)), server())
            .await
            .unwrap_err();
        assert!(
            s.contains("BadSignature") || s.contains("UnknownIssuer"),
            "{s}"
        );

        let (_, s) = handshake(client(CurrentSvid::new(|| None)), server())
            .await
            .unwrap_err();
        assert!(
            s.to_lowercase().contains("no certificate") || s.contains("NoCertificate"),
            "{s}"
        );
    }

    #[test]
    fn svid_ids_are_read_from_the_one_uri_san() {
        let ca = ca();
        let s = svid(&ca, A, -60, 60);
        let ck = (s.0)().unwrap();
        assert_eq!(spiffe_id(&ck.cert[0]).unwrap().to_string(), A);
    }
}
