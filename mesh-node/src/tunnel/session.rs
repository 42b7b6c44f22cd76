//! One TLS 1.3 tunnel connection: rustls's unbuffered state machine for the handshake, then
//! records sealed and opened here (`record.rs`) with the secrets rustls hands over.
//!
//! rustls is fed the handshake one whole record at a time, so it never consumes bytes past
//! its last handshake record: whatever the peer sent after that (the tunnel header, early
//! application bytes) stays here for the record layer. rustls keeps computing key updates
//! (`rustls::kernel::KernelConnection`): a peer's KeyUpdate is followed, and this side updates
//! its own key before the cipher suite's confidentiality limit. Session tickets are not used.
//!
//! One session carries one application connection at a time, and then the next (see
//! `pool.rs`): each direction of a connection ends with an empty application-data record
//! (TLS 1.3 allows them; this is the tunnel's end of stream), and once both directions have
//! ended the session is free for another header. close_notify ends the session itself.

use std::{
    io,
    ops::Range,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use rustls::{
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::{CertificateDer, ServerName},
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus},
    ClientConfig, ConnectionTrafficSecrets, ServerConfig, SupportedCipherSuite,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::record::{self, ContentType, Opener, RecordError, Sealer, MAX_PLAINTEXT};

/// Far more than any handshake flight of the mesh (two short certificate chains).
const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024;
/// TLS handshake message types that may follow the handshake (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("the peer closed the connection during the TLS handshake")]
    ClosedInHandshake,
    #[error("the peer's handshake is over {MAX_HANDSHAKE_BUFFER} bytes")]
    HandshakeTooLarge,
    #[error("the peer sent application data before the handshake finished")]
    DataInHandshake,
    #[error("cannot encode a handshake message: {0}")]
    Encode(String),
    #[error("the peer sent TLS alert {0}")]
    Alert(String),
    #[error("the peer sent a malformed or unexpected post-handshake message")]
    BadPostHandshake,
    #[error("the peer closed the connection without a TLS close_notify")]
    Truncated,
}

impl From<SessionError> for io::Error {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Io(e) => e,
            SessionError::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Next traffic secrets, computed by rustls.
trait NextKeys: Send {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D: Send> NextKeys for KernelConnection<D> {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_tx_secret()
    }
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_rx_secret()
    }
}

/// What both directions of a session share: the key schedule, and the peer's request that
/// this side update its sending key (answered before the next record is sent).
pub struct Rekey {
    keys: Mutex<Box<dyn NextKeys>>,
    peer_asked: AtomicBool,
}

impl Rekey {
    fn next(&self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), SessionError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        Ok(if tx { keys.next_tx()? } else { keys.next_rx()? })
    }
}

/// The sending direction.
pub struct Tx {
    sealer: Sealer,
    /// Records after which this side moves to a new key.
    rekey_at: u64,
}

impl Tx {
    /// Seals one record in place; see [`Sealer::seal`].
    pub fn seal(&mut self, record: &mut [u8], len: usize, ty: ContentType) -> usize {
        self.sealer.seal(record, len, ty)
    }

    /// Appends a KeyUpdate record to `out` and moves to the next key, when the peer asked for
    /// one or this key is near its limit. Call before sealing application data.
    pub fn maybe_update_key(
        &mut self,
        rekey: &Rekey,
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        if !rekey.peer_asked.swap(false, Ordering::AcqRel) && self.sealer.seq() < self.rekey_at {
            return Ok(());
        }
        // KeyUpdate, 1-byte body, update_not_requested.
        self.sealer
            .seal_to(&[KEY_UPDATE, 0, 0, 1, 0], ContentType::Handshake, out);
        let (seq, secrets) = rekey.next(true)?;
        self.sealer = Sealer::new(seq, &secrets)?;
        Ok(())
    }

    /// Appends the end of this direction's stream: an empty application-data record.
    pub fn end_of_stream(&mut self, out: &mut Vec<u8>) {
        self.sealer.seal_to(&[], ContentType::ApplicationData, out);
    }

    /// Appends a close_notify alert: the session ends.
    fn close_notify(&mut self, out: &mut Vec<u8>) {
        self.sealer.seal_to(&[1, 0], ContentType::Alert, out);
    }

    fn seal_to(&mut self, payload: &[u8], ty: ContentType, out: &mut Vec<u8>) {
        self.sealer.seal_to(payload, ty, out);
    }
}

/// What opening a run of records produced.
#[derive(Debug, Default)]
pub struct Opened {
    /// Bytes of the input that held complete records.
    pub consumed: usize,
    /// The peer ended its direction of the connection (end of stream or close_notify).
    pub ended: bool,
}

/// The receiving direction.
pub struct Rx {
    opener: Opener,
    /// Bytes read from the socket that are not opened yet (left over from the handshake or
    /// the header exchange; the relay takes them first).
    pub pending: Vec<u8>,
    /// Application bytes opened but not delivered yet (those after the header).
    pub plaintext: Vec<u8>,
    /// The peer sent close_notify: the session carries nothing more.
    pub closed: bool,
}

impl Rx {
    /// Opens every complete record at the start of `buf` in place and records where the
    /// application bytes are in `data`. Stops after the end of stream or close_notify.
    pub fn open(
        &mut self,
        rekey: &Rekey,
        buf: &mut [u8],
        data: &mut Vec<Range<usize>>,
    ) -> Result<Opened, SessionError> {
        let mut out = Opened::default();
        while let Some(len) = Opener::complete(&buf[out.consumed..])? {
            let start = out.consumed;
            let record = &mut buf[start..start + len];
            let (ty, range) = self.opener.open(record)?;
            out.consumed += len;
            match ty {
                ContentType::ApplicationData if !range.is_empty() => {
                    data.push(start + range.start..start + range.end);
                }
                ContentType::ApplicationData => {
                    out.ended = true;
                    return Ok(out);
                }
                ContentType::Alert => match record[range] {
                    // close_notify
                    [_, 0] => {
                        self.closed = true;
                        out.ended = true;
                        return Ok(out);
                    }
                    [_, desc] => {
                        return Err(SessionError::Alert(format!(
                            "{:?}",
                            rustls::AlertDescription::from(desc)
                        )))
                    }
                    _ => return Err(SessionError::BadPostHandshake),
                },
                ContentType::Handshake => self.post_handshake(rekey, &record[range])?,
            }
        }
        Ok(out)
    }

    /// KeyUpdate moves to the peer's next key; session tickets are ignored (this node does
    /// not resume sessions). Each message must lie within one record, as rustls sends them.
    fn post_handshake(&mut self, rekey: &Rekey, mut msgs: &[u8]) -> Result<(), SessionError> {
        while let [ty, a, b, c, ref rest @ ..] = *msgs {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let (body, next) = rest
                .split_at_checked(len)
                .ok_or(SessionError::BadPostHandshake)?;
            match (ty, body) {
                (KEY_UPDATE, [asked @ (0 | 1)]) => {
                    let (seq, secrets) = rekey.next(false)?;
                    self.opener = Opener::new(seq, &secrets)?;
                    if *asked == 1 {
                        rekey.peer_asked.store(true, Ordering::Release);
                    }
                }
                (NEW_SESSION_TICKET, _) => {}
                _ => return Err(SessionError::BadPostHandshake),
            }
            msgs = next;
        }
        if msgs.is_empty() {
            Ok(())
        } else {
            Err(SessionError::BadPostHandshake)
        }
    }
}

/// An established tunnel connection.
pub struct Session {
    tcp: TcpStream,
    tx: Tx,
    rx: Rx,
    rekey: Rekey,
    established: std::time::Instant,
    /// Counts the session among the open tunnels while it lives (see [`Session::track`]).
    tunnel: Option<crate::metrics::OpenTunnel>,
}

impl Session {
    /// Handshakes as the client of `name` (the verifier has checked the server's identity).
    /// Sessions are boxed: they are moved between the pool, the header exchange and the relay.
    pub async fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> Result<Box<Self>, SessionError> {
        let conn = UnbufferedClientConnection::new(config, name)?;
        Ok(Self::handshake(conn, tcp).await?.0)
    }

    /// Handshakes as the server; returns the session and the client's verified certificate
    /// chain, leaf first. The session does not keep the chain: idle sessions are many, and
    /// the caller needs only the identity and serial it names.
    pub async fn accept(
        config: Arc<ServerConfig>,
        tcp: TcpStream,
    ) -> Result<(Box<Self>, Vec<CertificateDer<'static>>), SessionError> {
        let conn = UnbufferedServerConnection::new(config)?;
        Self::handshake(conn, tcp).await
    }

    async fn handshake<C: Handshake>(
        mut conn: C,
        mut tcp: TcpStream,
    ) -> Result<(Box<Self>, Vec<CertificateDer<'static>>), SessionError> {
        let mut incoming = Vec::with_capacity(4096);
        let mut outgoing = Vec::new();
        let mut encoded = 0;
        loop {
            // One whole record at a time (or the partial first one): see the module comment.
            let end = record::complete_any(&incoming).unwrap_or(incoming.len());
            let status = conn.process(&mut incoming[..end]);
            let discard = status.discard;
            let step = match status.state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    loop {
                        match e.encode(&mut outgoing[encoded..]) {
                            Ok(n) => break encoded += n,
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => outgoing.resize(encoded + required_size, 0),
                            Err(e) => return Err(SessionError::Encode(e.to_string())),
                        }
                    }
                    Step::Again
                }
                ConnectionState::TransmitTlsData(t) => {
                    tcp.write_all(&outgoing[..encoded]).await?;
                    encoded = 0;
                    t.done();
                    Step::Again
                }
                ConnectionState::BlockedHandshake => Step::Wait,
                // A server may send before the client's Finished arrives; the handshake is
                // over only when rustls says so.
                ConnectionState::WriteTraffic(_) => Step::Ready,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(SessionError::ClosedInHandshake)
                }
                _ => return Err(SessionError::DataInHandshake),
            };
            incoming.drain(..discard);
            let step = match step {
                Step::Ready if !conn.handshaking() => break,
                Step::Ready | Step::Wait => {
                    if record::complete_any(&incoming).is_some() {
                        Step::Again
                    } else {
                        Step::Wait
                    }
                }
                other => other,
            };
            if let Step::Wait = step {
                if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                    return Err(SessionError::HandshakeTooLarge);
                }
                incoming.reserve(4096);
                if tcp.read_buf(&mut incoming).await? == 0 {
                    return Err(SessionError::ClosedInHandshake);
                }
            }
        }
        let peer_certificates = conn.peer_certificates();
        let rekey_at = match conn.suite() {
            Some(SupportedCipherSuite::Tls13(s)) => s.common.confidentiality_limit,
            _ => return Err(RecordError::UnsupportedSuite.into()),
        }
        // Leave room for the records of one relay batch past the check.
        .saturating_sub(1 << 10);
        let (secrets, keys) = conn.into_kernel()?;
        let session = Box::new(Self {
            tcp,
            tx: Tx {
                sealer: Sealer::new(secrets.tx.0, &secrets.tx.1)?,
                rekey_at,
            },
            rx: Rx {
                opener: Opener::new(secrets.rx.0, &secrets.rx.1)?,
                pending: incoming,
                plaintext: Vec::new(),
                closed: false,
            },
            rekey: Rekey {
                keys: Mutex::new(keys),
                peer_asked: AtomicBool::new(false),
            },
            established: std::time::Instant::now(),
            tunnel: None,
        });
        Ok((session, peer_certificates))
    }

    /// Time since the handshake.
    pub fn age(&self) -> std::time::Duration {
        self.established.elapsed()
    }

    /// Counts the session as an open tunnel until it drops, wherever it is then (the pool,
    /// a relay, an error path).
    pub fn track(&mut self, tunnel: crate::metrics::OpenTunnel) {
        self.tunnel = Some(tunnel);
    }

    /// Counts one more connection carried by the session.
    pub fn carry(&self) {
        if let Some(t) = &self.tunnel {
            t.stream();
        }
    }

    /// Whether the session can carry another connection: the peer has not closed it.
    pub fn reusable(&self) -> bool {
        !self.rx.closed
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The parts the relay drives; each direction is used by one side only.
    pub fn parts(&mut self) -> (&TcpStream, &mut Tx, &mut Rx, &Rekey) {
        (&self.tcp, &mut self.tx, &mut self.rx, &self.rekey)
    }

    /// Application bytes received (by [`Session::receive`]) and not consumed yet.
    pub fn received(&self) -> &[u8] {
        &self.rx.plaintext
    }

    pub fn consume(&mut self, n: usize) {
        self.rx.plaintext.drain(..n.min(self.rx.plaintext.len()));
    }

    /// Sends `bytes` (at most one record's worth) as application data.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        debug_assert!(bytes.len() <= MAX_PLAINTEXT);
        let mut out = Vec::new();
        self.tx.maybe_update_key(&self.rekey, &mut out)?;
        self.tx
            .seal_to(bytes, ContentType::ApplicationData, &mut out);
        self.tcp.write_all(&out).await?;
        Ok(())
    }

    /// Reads at least one more record, adding its application bytes to `rx.plaintext`.
    /// Returns false once the peer has ended its stream or closed the session.
    pub async fn receive(&mut self) -> Result<bool, SessionError> {
        loop {
            // Opening works in place, so the pending bytes are taken out while it runs.
            let mut pending = std::mem::take(&mut self.rx.pending);
            let mut data = Vec::new();
            let opened = self.rx.open(&self.rekey, &mut pending, &mut data);
            if let Ok(o) = &opened {
                for r in &data {
                    self.rx.plaintext.extend_from_slice(&pending[r.clone()]);
                }
                pending.drain(..o.consumed);
            }
            self.rx.pending = pending;
            let opened = opened?;
            if opened.ended {
                return Ok(false);
            }
            if opened.consumed > 0 {
                return Ok(true);
            }
            self.rx.pending.reserve(4096);
            if self.tcp.read_buf(&mut self.rx.pending).await? == 0 {
                return Err(SessionError::Truncated);
            }
        }
    }

    /// Sends close_notify, then FIN: the session ends in order.
    pub async fn close(&mut self) -> Result<(), SessionError> {
        let mut out = Vec::new();
        self.tx.close_notify(&mut out);
        self.tcp.write_all(&out).await?;
        self.tcp.shutdown().await?;
        Ok(())
    }
}

/// What the handshake loop does next.
enum Step {
    Again,
    Wait,
    Ready,
}

/// The parts of rustls's unbuffered client and server connections the handshake uses.
trait Handshake: Send {
    type Data: Send + 'static;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn peer_certificates(&self) -> Vec<CertificateDer<'static>>;
    fn suite(&self) -> Option<SupportedCipherSuite>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn NextKeys>), rustls::Error>;
}

macro_rules! handshake_impl {
    ($conn:ty, $data:ty) => {
        impl Handshake for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
                (**self)
                    .peer_certificates()
                    .map(<[_]>::to_vec)
                    .unwrap_or_default()
            }
            fn suite(&self) -> Option<SupportedCipherSuite> {
                self.negotiated_cipher_suite()
            }
            fn into_kernel(
                self,
            ) -> Result<(rustls::ExtractedSecrets, Box<dyn NextKeys>), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Box::new(kernel)))
            }
        }
    };
}

handshake_impl!(UnbufferedClientConnection, ClientConnectionData);
handshake_impl!(UnbufferedServerConnection, ServerConnectionData);

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        metrics::Traffic,
        proxy::relay::{relay, Stream},
        tunnel::tls::{
            client_config, server_config,
            tests::{ca, svid, trust, A, B},
        },
    };

    fn configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let ca = ca();
        let t = trust(&ca);
        let client = client_config(svid(&ca, A, -60, 3600), &t, B.parse().unwrap()).unwrap();
        let server = server_config(svid(&ca, B, -60, 3600), &t).unwrap();
        (Arc::new(client), Arc::new(server))
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A stock rustls client talks to a session relaying to an echo application: bytes in
    /// many record sizes, a key update the client asks both sides to make, and close_notify
    /// each way.
    #[tokio::test]
    async fn a_relayed_session_interoperates_with_stock_rustls() {
        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let (app_proxy_side, mut app) = pair().await;
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            loop {
                let n = app.read(&mut buf).await.unwrap();
                if n == 0 {
                    app.shutdown().await.unwrap();
                    return;
                }
                app.write_all(&buf[..n]).await.unwrap();
            }
        });
        let server = tokio::spawn(async move {
            let (mut session, chain) = Session::accept(server_config, server_tcp).await.unwrap();
            assert_eq!(
                crate::tunnel::tls::peer_identity(Some(&chain))
                    .unwrap()
                    .to_string(),
                A
            );
            // The first bytes arrive before the relay starts, as the tunnel header does.
            while session.received().len() < 5 {
                assert!(session.receive().await.unwrap());
            }
            assert_eq!(&session.received()[..5], b"hello");
            session.consume(5);
            relay(
                app_proxy_side,
                Stream::Tunnel(session),
                None,
                &Traffic::default(),
            )
            .await
        });
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let mut tls = connector.connect(name, client_tcp).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        let data = pattern(3 << 20);
        let (mut rd, mut wr) = tokio::io::split(tls);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(100_003) {
                wr.write_all(chunk).await.unwrap();
            }
            wr
        });
        let mut back = vec![0u8; data.len()];
        rd.read_exact(&mut back).await.unwrap();
        assert!(back == data, "the echoed bytes differ");
        let wr = writer.await.unwrap();
        let mut tls = rd.unsplit(wr);
        // A KeyUpdate that asks the session to update its sending key too.
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        tls.write_all(b"after the key update").await.unwrap();
        let mut buf = [0u8; 20];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after the key update");
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let done = server.await.unwrap().unwrap();
        assert_eq!(
            (done.sent, done.received),
            (data.len() as u64 + 20, data.len() as u64 + 20)
        );
        assert!(done.session.is_none(), "the client closed the session");
        echo.await.unwrap();
    }

    /// A session client against a stock rustls server, and a peer that drops the TCP
    /// connection without close_notify: the relay reports a truncation, not an end of stream.
    #[tokio::test]
    async fn a_session_client_talks_to_stock_rustls_and_refuses_truncation() {
        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let server = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
            let mut tls = acceptor.accept(server_tcp).await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong and more").await.unwrap();
            tls.flush().await.unwrap();
            // Gone without close_notify.
            drop(tls);
        });
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let mut session = Session::connect(client_config, name, client_tcp)
            .await
            .unwrap();
        session.send(b"ping").await.unwrap();
        while session.received().len() < 4 {
            assert!(session.receive().await.unwrap());
        }
        assert_eq!(&session.received()[..4], b"pong");
        session.consume(4);
        let (app_proxy_side, mut app) = pair().await;
        let relayed = tokio::spawn(async move {
            let traffic = Traffic::default();
            relay(app_proxy_side, Stream::Tunnel(session), None, &traffic).await
        });
        let mut got = Vec::new();
        let _ = app.read_to_end(&mut got).await;
        assert_eq!(got, b" and more");
        let Err(err) = relayed.await.unwrap() else {
            panic!("a truncated session relayed to its end");
        };
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        server.await.unwrap();
    }

    /// Two connections, one after the other, over one session between two relays: each
    /// direction ends with an end-of-stream record and the session comes back from both.
    #[tokio::test]
    async fn a_session_carries_one_connection_after_another() {
        use mesh_api::v1::{TunnelRequest, TunnelResponse};

        use crate::tunnel::header;

        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let server = tokio::spawn(async move {
            let (mut session, _) = Session::accept(server_config, server_tcp).await.unwrap();
            for round in 0..2u64 {
                let req: TunnelRequest = header::read(&mut session).await.unwrap();
                assert_eq!(req.connection_id, round);
                header::write(&mut session, &TunnelResponse::default())
                    .await
                    .unwrap();
                let (proxy_side, mut app) = pair().await;
                let echo = tokio::spawn(async move {
                    let mut got = Vec::new();
                    app.read_to_end(&mut got).await.unwrap();
                    app.write_all(&got).await.unwrap();
                });
                let done = relay(
                    proxy_side,
                    Stream::Tunnel(session),
                    None,
                    &Traffic::default(),
                )
                .await
                .unwrap();
                echo.await.unwrap();
                session = done.session.expect("the session comes back");
            }
        });
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let mut session = Session::connect(client_config, name, client_tcp)
            .await
            .unwrap();
        for round in 0..2u64 {
            let req = TunnelRequest {
                connection_id: round,
                ..Default::default()
            };
            header::write(&mut session, &req).await.unwrap();
            let _: TunnelResponse = header::read(&mut session).await.unwrap();
            let (proxy_side, mut app) = pair().await;
            let data = pattern(200_000 + round as usize);
            let sent = data.clone();
            let app_side = tokio::spawn(async move {
                app.write_all(&sent).await.unwrap();
                app.shutdown().await.unwrap();
                let mut back = Vec::new();
                app.read_to_end(&mut back).await.unwrap();
                back
            });
            let done = relay(
                proxy_side,
                Stream::Tunnel(session),
                None,
                &Traffic::default(),
            )
            .await
            .unwrap();
            assert!(
                app_side.await.unwrap() == data,
                "round {round}: echo differs"
            );
            assert_eq!(
                (done.sent, done.received),
                (data.len() as u64, data.len() as u64)
            );
            session = done.session.expect("the session comes back");
        }
        server.await.unwrap();
    }
}
