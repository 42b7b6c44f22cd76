//! A hand-made tunnel client: dials a pod's :15008 from inside a chosen netns with any
//! certificate (or none), over TLS ([`dial`]) or QUIC ([`dial_quic`]), to check what a
//! destination node accepts and refuses. It trusts any server certificate and hands it back
//! for the test to inspect.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::Arc,
    time::Duration,
};

use mesh_api::v1::{TunnelRequest, TunnelResponse};
use prost::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
};

/// A CA that can issue arbitrary workload certificates: the mesh's own (loaded from mesh-cp's
/// data dir) or a foreign one.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate chain and its key.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    /// mesh-cp's CA from its data dir (`ca.crt`, `ca.key`).
    pub fn load(data_dir: &Path) -> io::Result<Self> {
        let cert = fs::read_to_string(data_dir.join("ca.crt"))?;
        let key = KeyPair::from_pem(&fs::read_to_string(data_dir.join("ca.key"))?)
            .map_err(io::Error::other)?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(io::Error::other)?;
        Ok(Self { issuer })
    }

    /// A new CA the mesh does not trust.
    pub fn foreign() -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe_id`, valid from `from` to `until`.
    pub fn issue(
        &self,
        spiffe_id: &str,
        from: time::OffsetDateTime,
        until: time::OffsetDateTime,
    ) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = from;
        params.not_after = until;
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// Valid for an hour from a minute ago.
    pub fn issue_valid(&self, spiffe_id: &str) -> Issued {
        let now = time::OffsetDateTime::now_utc();
        self.issue(
            spiffe_id,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
    }
}

/// What one tunnel attempt got.
pub struct Outcome {
    /// The certificate the server presented, if the handshake got that far.
    pub server_cert: Option<CertificateDer<'static>>,
    /// The server's answer to the header, or the error that ended the attempt.
    pub response: Result<TunnelResponse, String>,
    /// When the answer was OK: the open tunnel, for application bytes.
    pub stream: Option<StreamOwned<ClientConnection, TcpStream>>,
}

/// A raw TLS tunnel from pod `from` to pod `to`'s :15008 with a valid certificate for
/// `identity` from the mesh CA in `data_dir`, asking for `to`:`port` as from `from`:40000,
/// connection id 7: a client that skips its own node and the kernel checks there, so only the
/// destination's checks decide.
pub fn dial_as(
    data_dir: &Path,
    from: &crate::Pod,
    to: &crate::Pod,
    port: u16,
    identity: &str,
) -> io::Result<Outcome> {
    let ca = TestCa::load(data_dir)?;
    let request = TunnelRequest {
        destination_address: mesh_api::ip_to_bytes(to.ipv4.into()),
        destination_port: u32::from(port),
        source_address: mesh_api::ip_to_bytes(from.ipv4.into()),
        source_port: 40000,
        connection_id: 7,
    };
    dial(
        &from.netns_path(),
        SocketAddr::new(to.ipv4.into(), 15008),
        Some(&ca.issue_valid(identity)),
        &request,
    )
}

/// Connects to `dst` from inside `netns`, does the TLS handshake presenting `cert`, sends
/// `request` and reads the answer.
pub fn dial(
    netns: &Path,
    dst: SocketAddr,
    cert: Option<&Issued>,
    request: &TunnelRequest,
) -> io::Result<Outcome> {
    let tcp = connect_in(netns, dst)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let config = client_config(cert)?;
    let conn = ClientConnection::new(Arc::new(config), ServerName::IpAddress(dst.ip().into()))
        .map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    let exchange =
        |tls: &mut StreamOwned<ClientConnection, TcpStream>| -> io::Result<TunnelResponse> {
            tls.write_all(&request.encode_length_delimited_to_vec())?;
            tls.flush()?;
            let mut len = 0usize;
            for shift in [0, 7] {
                let mut b = [0u8];
                tls.read_exact(&mut b)?;
                len |= usize::from(b[0] & 0x7f) << shift;
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            let mut buf = vec![0u8; len];
            tls.read_exact(&mut buf)?;
            TunnelResponse::decode(buf.as_slice()).map_err(io::Error::other)
        };
    let response = exchange(&mut tls).map_err(|e| e.to_string());
    let server_cert = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let ok = response
        .as_ref()
        .is_ok_and(|r| r.status() == mesh_api::v1::tunnel_response::Status::Ok);
    Ok(Outcome {
        server_cert,
        response,
        stream: ok.then_some(tls),
    })
}

/// TLS 1.3 presenting `cert` (or nothing), trusting any server.
pub fn client_config(cert: Option<&Issued>) -> io::Result<ClientConfig> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    Ok(match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), PrivateKeyDer::Pkcs8(c.key.clone_key()))
            .map_err(io::Error::other)?,
        None => builder.with_no_client_auth(),
    })
}

/// What one QUIC tunnel attempt got.
pub struct QuicOutcome {
    pub server_cert: Option<CertificateDer<'static>>,
    pub response: Result<TunnelResponse, String>,
    /// When the answer was OK: whether "ping\n" on the stream got "pong\n" back.
    pub pong: bool,
}

/// Like [`dial`], over QUIC: a connection to `dst` from a UDP socket inside `netns`, one
/// stream with `request`, and on an OK answer one ping through it.
pub fn dial_quic(
    netns: &Path,
    dst: SocketAddr,
    cert: Option<&Issued>,
    request: &TunnelRequest,
) -> io::Result<QuicOutcome> {
    let socket = in_netns(netns, || {
        std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
    })?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_config(cert)?)
        .map_err(io::Error::other)?;
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let attempt = async {
            let conn = endpoint
                .connect_with(config, dst, &dst.ip().to_string())
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let server_cert = conn
                .peer_identity()
                .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|certs| certs.first().cloned());
            let exchange = async {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&request.encode_length_delimited_to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut got = Vec::new();
                let response = loop {
                    if let Ok(r) = TunnelResponse::decode_length_delimited(got.as_slice()) {
                        break r;
                    }
                    match recv.read_chunk(1024, true).await {
                        Ok(Some(chunk)) => got.extend_from_slice(&chunk.bytes),
                        Ok(None) => return Err("the stream ended before an answer".to_owned()),
                        Err(e) => return Err(e.to_string()),
                    }
                };
                let mut pong = false;
                if response.status() == mesh_api::v1::tunnel_response::Status::Ok {
                    send.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
                    let mut buf = [0u8; 5];
                    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                    pong = &buf == b"pong\n";
                }
                Ok::<_, String>((response, pong))
            };
            let (response, pong) = match exchange.await {
                Ok((r, pong)) => (Ok(r), pong),
                Err(e) => (Err(e), false),
            };
            conn.close(0u32.into(), b"");
            Ok::<_, String>(QuicOutcome {
                server_cert,
                response,
                pong,
            })
        };
        let outcome = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => QuicOutcome {
                server_cert: None,
                response: Err(e),
                pong: false,
            },
            Err(_) => QuicOutcome {
                server_cert: None,
                response: Err("no answer within 10 s".into()),
                pong: false,
            },
        };
        endpoint.wait_idle().await;
        Ok(outcome)
    })
}

/// Runs `f` on a short-lived thread inside `netns`; sockets it makes stay in that netns.
pub(crate) fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let file = fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an fd we own; only this short-lived thread changes namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

/// A TCP connection made from inside `netns` (the socket stays in that netns).
pub fn connect_in(netns: &Path, dst: SocketAddr) -> io::Result<TcpStream> {
    in_netns(netns, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })
}

/// The SPIFFE ID and serial (as mesh-node's `/debug/certs` shows it) of a certificate.
pub fn describe(cert: &CertificateDer<'_>) -> (String, String) {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("certificate");
    let uri = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        })
        .unwrap_or_default();
    (uri, parsed.raw_serial_as_string())
}

#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
